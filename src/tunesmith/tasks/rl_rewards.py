"""The rewards of an RL run: each scores completions, the run sums them with weights.

Built in: ``answer`` (exact, or a regular expression that extracts the answer
from the completion, against a column of the row), ``length`` (a penalty,
``-tokens / max_new_tokens``) and ``classifier`` (a saved tunesmith
classifier's probability of a label; loading a saved run is the runs layer's
job, so it arrives as a ``Scorer`` from there). ``custom`` imports
``module:function`` and calls it with the prompts, the completions and the
rows' other columns as keyword lists (the shape TRL's reward functions have);
the config refuses it without ``rl.allow_custom_reward``.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.config.rl import AnswerReward, ClassifierReward, CustomReward, LengthReward
from tunesmith.errors import ConfigError, DataError

#: Texts in, one probability per text out (a classifier's chosen label).
Scorer = Callable[[Sequence[str]], list[float]]
#: Loads a classifier reward's scorer from its config (given by the runs layer).
ScorerLoader = Callable[[ClassifierReward], Scorer]


@dataclass
class Scored:
    """What a reward function sees of a batch of completions."""

    prompts: list[str]
    completions: list[str]
    lengths: list[int]
    columns: list[Mapping[str, Any]]


class Reward:
    """One weighted reward; ``__call__`` gives one float per completion."""

    def __init__(self, name: str, weight: float, fn: Callable[[Scored], list[float]]) -> None:
        self.name, self.weight, self.fn = name, weight, fn

    def __call__(self, scored: Scored) -> torch.Tensor:
        values = self.fn(scored)
        if len(values) != len(scored.completions):
            raise ConfigError(
                f"reward {self.name}: returned {len(values)} values for "
                f"{len(scored.completions)} completions"
            )
        out = torch.tensor([float(v) for v in values], dtype=torch.float32)
        if not torch.isfinite(out).all():
            raise ConfigError(f"reward {self.name}: returned a value that is not finite")
        return out


class RewardSet:
    """The run's rewards: each one's values, and their weighted sum."""

    def __init__(self, rewards: Sequence[Reward]) -> None:
        self.rewards = list(rewards)
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ConfigError(f"rl.rewards: two rewards share a name ({names}); give each a name")

    def __call__(self, scored: Scored) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted total per completion and each reward's own values."""
        parts = {r.name: r(scored) for r in self.rewards}
        total = sum(r.weight * parts[r.name] for r in self.rewards)
        assert isinstance(total, torch.Tensor)
        return total, parts


def build_rewards(
    configs: Sequence[Any], max_new_tokens: int, load_scorer: ScorerLoader | None
) -> RewardSet:
    """The rewards of ``rl.rewards``.

    Raises:
        ConfigError: A classifier reward without a loader, or a custom function
            that cannot be imported.
    """
    rewards = []
    for cfg in configs:
        if isinstance(cfg, AnswerReward):
            rewards.append(Reward(cfg.name or "answer", cfg.weight, answer_check(cfg)))
        elif isinstance(cfg, LengthReward):
            rewards.append(Reward(cfg.name or "length", cfg.weight, length_penalty(max_new_tokens)))
        elif isinstance(cfg, ClassifierReward):
            if load_scorer is None:
                raise ConfigError("a classifier reward needs the saved classifier loaded")
            rewards.append(
                Reward(cfg.name or "classifier", cfg.weight, classified(load_scorer(cfg), cfg.text))
            )
        elif isinstance(cfg, CustomReward):
            rewards.append(
                Reward(cfg.name or cfg.function, cfg.weight, custom_function(cfg.function))
            )
        else:  # pragma: no cover - the config admits these four only
            raise ConfigError(f"unknown reward {cfg!r}")
    return RewardSet(rewards)


def classified(scorer: Scorer, text: str) -> Callable[[Scored], list[float]]:
    """The scorer on each completion, or on ``prompt + " " + completion``."""
    if text == "completion":
        return lambda scored: scorer(scored.completions)
    return lambda scored: scorer(
        [f"{p} {c}".strip() for p, c in zip(scored.prompts, scored.completions, strict=True)]
    )


def answer_check(cfg: AnswerReward) -> Callable[[Scored], list[float]]:
    """1.0 where the completion's answer equals the row's ``cfg.column``, else 0.0."""
    pattern = re.compile(cfg.pattern) if cfg.pattern is not None else None

    def check(scored: Scored) -> list[float]:
        out = []
        for text, row in zip(scored.completions, scored.columns, strict=True):
            if cfg.column not in row:
                raise DataError(
                    f"answer reward: the row has no column {cfg.column!r} "
                    f"(columns: {', '.join(sorted(row)) or 'none'})"
                )
            out.append(float(extract(text, pattern) == str(row[cfg.column]).strip()))
        return out

    return check


def extract(text: str, pattern: re.Pattern[str] | None) -> str | None:
    """The answer in ``text``: the pattern's first group (else its match), or the whole text."""
    if pattern is None:
        return text.strip()
    match = pattern.search(text)
    if match is None:
        return None
    return (match.group(1) if match.groups() else match.group(0)).strip()


def length_penalty(max_new_tokens: int) -> Callable[[Scored], list[float]]:
    """``-tokens / max_new_tokens`` per completion: 0 for an empty one, -1 for a full one."""
    return lambda scored: [-n / max_new_tokens for n in scored.lengths]


def custom_function(spec: str) -> Callable[[Scored], list[float]]:
    """The user's ``module:function`` as a reward (called as TRL calls reward functions).

    Raises:
        ConfigError: The module cannot be imported or has no such function.
    """
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"rl.rewards: cannot import {module_name!r} ({err})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"rl.rewards: {module_name!r} has no function {name!r}")

    def call(scored: Scored) -> list[float]:
        keys = {k for row in scored.columns for k in row}
        columns = {k: [row.get(k) for row in scored.columns] for k in sorted(keys)}
        values = fn(prompts=scored.prompts, completions=scored.completions, **columns)
        return [math.nan if v is None else float(v) for v in values]

    return call
