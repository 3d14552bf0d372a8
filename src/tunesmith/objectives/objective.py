"""What the loop minimises beyond the task loss: per-batch loss terms and per-step penalties.

Two kinds of additions, one mechanism each, so the loop has no special cases:

* a **loss term** (knowledge distillation) is a sum over the same targets as the
  task loss, so it shares its normaliser and gradient accumulation stays exact;
  it may also scale the task loss (``task_weight``, KD's ``1 - alpha``);
* a **regulariser** (L2-SP, EWC) is a penalty on the weights, added once per
  optimizer step: to the last micro-batch's loss, inside the step's gradient
  synchronisation. Every process adds the same penalty to its loss, and DDP
  averages gradients over processes, so the penalty's gradient arrives once,
  exactly (the task part is scaled by the number of processes for the same
  reason, see ``Trainer.train_step``).

Each part is logged under its own name in ``metrics.jsonl`` (``loss/kd``,
``loss/l2_sp``, ``loss/ewc``: what it adds to the minimised objective, weight
included); ``loss`` stays the plain task loss and ``loss/total`` is the
objective: ``task_weight * loss`` plus every part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class LossTerm(Protocol):
    """A per-batch addition to the loss, summed over the task's targets."""

    name: str
    #: Factor on the task loss while this term is used (1: unchanged).
    task_weight: float

    def loss_sum(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed over the batch's targets, weight included (divided by the task's normaliser)."""


class Regulariser(Protocol):
    """A penalty on the weights, added once per optimizer step."""

    name: str

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """The penalty's value (a scalar with gradients to the weights), weight included."""


@dataclass
class Objective:
    """The task loss, scaled, plus loss terms and regularisers.

    Attributes:
        terms: Per-batch loss terms.
        regularisers: Per-step penalties.
    """

    terms: Sequence[LossTerm] = ()
    regularisers: Sequence[Regulariser] = ()
    _parts: dict[str, float] = field(default_factory=dict)

    @property
    def task_weight(self) -> float:
        """Factor on the task loss (the product of the terms' factors)."""
        weight = 1.0
        for term in self.terms:
            weight *= term.task_weight
        return weight

    def batch_loss(
        self, task_sum: torch.Tensor, outputs: Any, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The micro-batch's summed objective from its summed task loss."""
        total = task_sum * self.task_weight if self.terms else task_sum
        for term in self.terms:
            value = term.loss_sum(outputs, batch)
            self._add(term.name, value)
            total = total + value
        return total

    def step_penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """The sum of the regularisers' penalties for this step (None: there are none)."""
        total = None
        for reg in self.regularisers:
            value = reg.penalty(model)
            self._add(reg.name, value)
            total = value if total is None else total + value
        return total

    def take_parts(self) -> dict[str, float]:
        """The parts accumulated since the last call (term sums, penalty values)."""
        parts, self._parts = self._parts, {}
        return parts

    def log_fields(
        self, task_loss: float, parts: dict[str, float], targets: float, steps: int
    ) -> dict[str, float]:
        """``loss/<part>`` per logged window: terms per target, penalties per step.

        Args:
            task_loss: The window's mean task loss (``loss``).
            parts: Summed parts of the window's steps (``take_parts`` added up).
            targets: The window's summed normaliser.
            steps: Optimizer steps in the window.
        """
        if not self.terms and not self.regularisers:
            return {}
        fields = {
            f"loss/{t.name}": parts.get(t.name, 0.0) / max(targets, 1e-12) for t in self.terms
        }
        fields |= {
            f"loss/{r.name}": parts.get(r.name, 0.0) / max(steps, 1) for r in self.regularisers
        }
        fields["loss/total"] = self.task_weight * task_loss + sum(fields.values())
        return fields

    def _add(self, name: str, value: torch.Tensor) -> None:
        self._parts[name] = self._parts.get(name, 0.0) + float(value.detach())
