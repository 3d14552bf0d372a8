"""The training loop's mutable state: one dataclass, saved and restored as a whole.

Everything the loop changes while it runs (position in the data, counters, the
sums behind the next log line, early stopping, totals) lives in ``TrainState``
and nowhere else, so a checkpoint is ``state_dict()`` (plus the optimizer,
scheduler and RNG states) and resuming is ``load_state_dict()``: a value the
loop mutates cannot be forgotten by the checkpoint without being forgotten by
this class too.

``state_dict()`` is plain JSON (numbers, strings, lists, dicts): floats
round-trip exactly through JSON, which is what makes a resumed run bit-equal
to an uninterrupted one.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tunesmith.training.early_stop import EarlyStopping


@dataclass
class LoopResult:
    """What the loop did: steps, timing, the best evaluation."""

    steps: int = 0
    epochs: float = 0.0
    train_seconds: float = 0.0
    real_tokens: int = 0
    #: Targets of all taken steps (a causal LM's trained tokens).
    targets: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    peak_rss_mb: float = 0.0
    last_validation: dict[str, Any] = field(default_factory=dict)
    #: Seconds spent building the feature cache (also counted in ``train_seconds``).
    cache_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Real (non-pad) training tokens per second of training time."""
        return self.real_tokens / self.train_seconds if self.train_seconds else 0.0


@dataclass
class LogWindow:
    """Sums over the optimizer steps since the last ``train`` log line.

    A log line reports means over its window (loss per target, tokens per
    second, the objective's parts), so the sums must survive a checkpoint
    taken between two log lines.
    """

    loss: float = 0.0
    targets: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    #: The objective's parts (``Objective.take_parts``) summed over the window's steps.
    parts: dict[str, float] = field(default_factory=dict)
    #: Optimizer steps in the window (skipped steps not counted).
    steps: int = 0

    def add_step(self, loss: float, targets: float, tokens: int, parts: dict[str, float]) -> None:
        """Add one taken step's sums (its time is added as it passes, skipped steps included)."""
        self.loss += loss
        self.targets += targets
        self.tokens += tokens
        for name, value in parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + value
        self.steps += 1


@dataclass
class TrainState:
    """All the loop mutates; ``state_dict()`` is what a checkpoint stores of it.

    Attributes:
        stopper: Early stopping: the best value of the selection metric, its
            step and the evaluations since (its rule comes from the config).
        step: Optimizer steps taken (skipped non-finite steps not counted).
        epoch: The current epoch (0-based).
        batches_in_epoch: Micro-batches of the current epoch already consumed.
        updates_done: Optimizer steps taken on the current window's batches (RL takes
            ``rl.iterations`` on each window's rollouts; other tasks one).
        bad_steps: Consecutive skipped (non-finite) steps.
        window: Sums since the last train log line.
        last_eval_step: Step of the last evaluation (None: none yet).
        stopped_early: Early stopping ended the run.
        last_validation: Metrics of the last evaluation.
        real_tokens: Real (non-pad) training tokens of all taken steps.
        targets: Targets (trained tokens, labels) of all taken steps.
        train_seconds: Training time (batching and steps, not evaluation).
        cache_seconds: Time spent building the feature cache (in ``train_seconds`` too).
    """

    stopper: EarlyStopping
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    updates_done: int = 0
    bad_steps: int = 0
    window: LogWindow = field(default_factory=LogWindow)
    last_eval_step: int | None = None
    stopped_early: bool = False
    last_validation: dict[str, Any] = field(default_factory=dict)
    real_tokens: int = 0
    targets: float = 0.0
    train_seconds: float = 0.0
    cache_seconds: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        """The state as JSON-ready values (the stopper's rule is config, not state)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["window"] = asdict(self.window)
        values["stopper"] = {
            "best": self.stopper.best,
            "best_step": self.stopper.best_step,
            "bad_evals": self.stopper.bad_evals,
        }
        return copy.deepcopy(values)

    def load_state_dict(self, values: dict[str, Any]) -> None:
        """Take over ``state_dict()``'s values in place (other keys are ignored, missing kept).

        Also reads checkpoints written before this class existed (``window``
        a list of four sums, totals under ``result``); their window had no
        objective parts or step count, which then start empty as they did.
        """
        values = copy.deepcopy(_upgrade(values))
        for f in fields(self):
            if f.name not in ("stopper", "window") and f.name in values:
                setattr(self, f.name, values[f.name])
        self.window = LogWindow(**values["window"])
        stopper = values["stopper"]
        self.stopper.best = stopper["best"]
        self.stopper.best_step = stopper["best_step"]
        self.stopper.bad_evals = stopper["bad_evals"]

    def result(self, steps_per_epoch: int, peak_rss_mb: float = 0.0) -> LoopResult:
        """What the loop did so far, as ``Trainer.run`` reports it."""
        return LoopResult(
            steps=self.step,
            epochs=self.step / steps_per_epoch,
            train_seconds=self.train_seconds,
            real_tokens=self.real_tokens,
            targets=self.targets,
            best_metric=self.stopper.best,
            best_step=self.stopper.best_step,
            stopped_early=self.stopped_early,
            peak_rss_mb=peak_rss_mb,
            last_validation=self.last_validation,
            cache_seconds=self.cache_seconds,
        )


def _upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """The earlier checkpoint layout (``window`` list, ``result`` totals) in today's keys."""
    if not isinstance(values.get("window"), list):
        return values
    loss, targets, tokens, seconds = values["window"]
    result = values["result"]
    return {
        **values,
        "window": {"loss": loss, "targets": targets, "tokens": tokens, "seconds": seconds},
        **{
            key: result[key]
            for key in (
                "stopped_early",
                "last_validation",
                "real_tokens",
                "train_seconds",
                "cache_seconds",
            )
            if key in result
        },
    }
