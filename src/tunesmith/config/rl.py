"""The ``rl`` section: online reinforcement fine-tuning (``task.type: rl``), GRPO and RLOO.

Rollouts are always sampled: a group of greedy completions of one prompt is
identical, every reward in it equal and every advantage zero, so a temperature
of 0 is refused rather than silently training nothing. The losses and the
meaning of every key follow TRL 1.16 (the oracle the tests compare with; ``docs/tasks.md``).

Rewards are a list, each with a weight: a saved tunesmith classifier
(reward = probability of one of its labels), an answer check against a column
of the row (exact, or a regular expression that extracts the answer), a length
penalty, or a user function ``module:function``, which runs only with
``rl.allow_custom_reward: true`` because it executes code named by the config.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from tunesmith.config.base import Section
from tunesmith.config.specs import Problem

#: Keys only one algorithm reads (a key the chosen one ignores is an error).
ALGORITHM_KEYS: dict[str, frozenset[str]] = {
    "grpo": frozenset({"scale_rewards", "loss_type", "kl_bias_correction"}),
    "rloo": frozenset({"normalize_advantages"}),
}
#: Each algorithm's KL coefficient when ``rl.beta`` is not set (TRL 1.16's defaults).
DEFAULT_BETA = {"grpo": 0.0, "rloo": 0.05}


class ClassifierReward(Section):
    """Reward = the probability a saved tunesmith classifier gives one of its labels."""

    type: Literal["classifier"]
    path: str = Field(..., description="A saved classifier run's best/ or final/ folder.")
    label: str = Field(..., description="The label whose probability is the reward.")
    text: Literal["completion", "prompt_and_completion"] = Field(
        "completion",
        description="What the classifier reads: the completion, or the prompt's text, a "
        "space and the completion (a continued review).",
    )
    weight: float = Field(1.0, description="Weight of this reward in the sum.")
    name: str | None = Field(None, description="Name in the metrics (default: classifier).")


class AnswerReward(Section):
    """Reward 1 when the completion's answer equals the row's answer column, else 0."""

    type: Literal["answer"]
    column: str = Field("answer", description="The column of the row holding the answer.")
    pattern: str | None = Field(
        None,
        description="Regular expression finding the answer in the completion (its first "
        "group, else the whole match; no match: reward 0). None: the whole completion.",
    )
    weight: float = Field(1.0, description="Weight of this reward in the sum.")
    name: str | None = Field(None, description="Name in the metrics (default: answer).")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"not a regular expression: {err}") from None
        return value


class LengthReward(Section):
    """Reward = -(completion tokens / rl.max_new_tokens): a length penalty, in [-1, 0]."""

    type: Literal["length"]
    weight: float = Field(1.0, description="Weight of this reward in the sum.")
    name: str | None = Field(None, description="Name in the metrics (default: length).")


class CustomReward(Section):
    """A user function ``module:function(prompts, completions, **columns) -> list[float]``."""

    type: Literal["custom"]
    function: str = Field(..., description="module:function, importable from the run's folder.")
    weight: float = Field(1.0, description="Weight of this reward in the sum.")
    name: str | None = Field(None, description="Name in the metrics (default: the function).")

    @field_validator("function")
    @classmethod
    def _named(cls, value: str) -> str:
        module, _, func = value.partition(":")
        if not module or not func.isidentifier():
            raise ValueError(f"{value!r}: give module:function (e.g. my_rewards:score)")
        return value


RewardConfig = Annotated[
    ClassifierReward | AnswerReward | LengthReward | CustomReward, Field(discriminator="type")
]


class RLConfig(Section):
    """Online reinforcement fine-tuning (``task.type: rl``): rollouts, rewards, the loss."""

    algorithm: Literal["grpo", "rloo"] = Field(
        "grpo", description="grpo (group-normalised advantages) or rloo (leave-one-out baseline)."
    )
    rewards: list[RewardConfig] = Field(
        default_factory=list,
        description="The rewards, summed with their weights: each {type: classifier | answer | "
        "length | custom, weight, ...} (see docs/tasks.md).",
    )
    group_size: int = Field(
        4, ge=2, description="Completions sampled per prompt (G); advantages compare within it."
    )
    temperature: float = Field(
        1.0, description="Sampling temperature of the rollouts (must be above 0)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    max_new_tokens: int = Field(64, ge=1, description="Most tokens of one completion.")
    stop_at_eos: bool = Field(
        True, description="End a completion at the end-of-sequence token (false: always full)."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="grpo: divide advantages by the group's reward std, the batch's, or not.",
    )
    loss_type: Literal["grpo", "dapo", "bnpo", "dr_grpo"] = Field(
        "dapo",
        description="grpo: how token losses are averaged (TRL's names): grpo per sequence, dapo "
        "over the tokens of the accumulated batch, bnpo over the micro-batch's tokens, "
        "dr_grpo over rows x max_new_tokens.",
    )
    normalize_advantages: bool = Field(
        False, description="rloo: standardise the advantages over the batch."
    )
    epsilon: float = Field(0.2, gt=0, description="Clipping of the probability ratio: 1 +- eps.")
    epsilon_high: float | None = Field(
        None, gt=0, description="Upper clip 1 + epsilon_high (None: epsilon; DAPO uses 0.28)."
    )
    beta: float | None = Field(
        None,
        ge=0,
        description="KL coefficient to the reference: grpo adds it to the loss (default 0), "
        "rloo subtracts beta x KL from the reward (default 0.05).",
    )
    kl_bias_correction: bool = Field(
        True,
        description="grpo: multiply the KL term by the probability ratio (TRL's "
        "use_bias_correction_kl), the unbiased reverse-KL gradient off-policy too.",
    )
    iterations: int = Field(
        1, ge=1, description="Updates on each batch of rollouts (TRL's num_iterations, mu)."
    )
    allow_custom_reward: bool = Field(
        False, description="Allow rewards of type custom (they run code named by the config)."
    )
    max_kl: float | None = Field(
        None,
        gt=0,
        description="Stop the run when the rollouts' mean KL to the reference passes this.",
    )
    max_clip_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Stop the run when the share of clipped tokens of an update passes this.",
    )
    eval_samples: int = Field(
        16, ge=0, description="Prompts, completions and rewards written per evaluation (JSONL)."
    )

    @property
    def kl_coef(self) -> float:
        """``beta``, or the algorithm's default."""
        return DEFAULT_BETA[self.algorithm] if self.beta is None else self.beta

    @property
    def upper_epsilon(self) -> float:
        """The upper clip's epsilon."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def rl_problems(task_type: str, rl: RLConfig, cfg: Any) -> list[Problem]:
    """What in ``rl`` the run cannot do or would not read.

    Outside ``task.type: rl`` every changed key is an error; inside it, keys
    of the other algorithm, a temperature of 0, no reward, and custom rewards
    without the opt-in.
    """
    fields = RLConfig.model_fields
    changed = [
        key
        for key, spec in fields.items()
        if getattr(rl, key) != spec.get_default(call_default_factory=True)
    ]
    if task_type != "rl":
        return [
            Problem(
                f"rl.{key}", f"rl.{key}: only read with task.type rl (task.type is {task_type})"
            )
            for key in changed
        ]
    other = {k for name, keys in ALGORITHM_KEYS.items() if name != rl.algorithm for k in keys}
    problems = [
        Problem(f"rl.{key}", f"rl.{key}: not read by rl.algorithm {rl.algorithm}")
        for key in changed
        if key in other
    ]
    if rl.temperature <= 0:
        problems.append(
            Problem(
                "rl.temperature",
                f"rl.temperature: {rl.temperature}; rollouts must be sampled (above 0): greedy "
                "completions of a prompt are identical, so every advantage would be 0",
            )
        )
    if not rl.rewards:
        problems.append(
            Problem(
                "rl.rewards",
                "rl.rewards: give at least one reward ({type: classifier | answer | length | "
                "custom, ...})",
                missing=True,
            )
        )
    method = getattr(getattr(cfg, "method", None), "name", None)
    if method in ("prefix", "prompt"):
        problems.append(
            Problem(
                "method.name",
                f"method.name: {method} with task.type rl; rollouts come from the batched "
                "generator, which cannot feed peft's virtual tokens: use lora, dora, ia3, "
                "bottleneck or full",
            )
        )
    for i, reward in enumerate(rl.rewards):
        if isinstance(reward, CustomReward) and not rl.allow_custom_reward:
            problems.append(
                Problem(
                    "rl.rewards",
                    f"rl.rewards[{i}]: a custom reward ({reward.function}) runs code named by "
                    "the config; set rl.allow_custom_reward: true to allow it",
                )
            )
    return problems
