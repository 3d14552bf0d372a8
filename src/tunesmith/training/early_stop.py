"""Early stopping and best-checkpoint selection on one metric."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EarlyStopping:
    """Tracks the best value of the selection metric and the evaluations since.

    Attributes:
        higher_is_better: Direction of the metric.
        patience: Evaluations without improvement before stopping (None: never).
        min_delta: Smallest change that counts as an improvement.
    """

    higher_is_better: bool
    patience: int | None = 3
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0

    def update(self, value: float, step: int) -> bool:
        """Record an evaluation; return True when it is a new best."""
        improved = self.best is None or (
            value > self.best + self.min_delta
            if self.higher_is_better
            else value < self.best - self.min_delta
        )
        if improved:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return improved

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` evaluations in a row brought no improvement."""
        return self.patience is not None and self.bad_evals >= self.patience
