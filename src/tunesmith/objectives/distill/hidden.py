"""Hidden-state matching: the student's block outputs pulled toward the teacher's.

``distill.hidden_weight`` adds ``beta * mean((h_s - h_t)^2)`` over the real
(non-padding) tokens and the matched block pairs, logged as ``loss/hidden``.
Student block ``j`` is matched with the teacher block it was copied from
(``distill.student_layers``), or, for a separate student model, with evenly
spaced teacher blocks (the last with the last). Both need the same hidden size:
a projection between sizes would be one more trained module, and is not offered.

Block outputs are read with forward hooks, so neither model's call changes;
the teacher runs on every training batch (hidden states are too large to
cache), once per batch even when the KD term also needs its logits live
(``LiveTeacher`` keeps the last batch's result).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tunesmith.errors import ConfigError
from tunesmith.models.adapter_modules import map_hidden
from tunesmith.models.layers import discover_layers
from tunesmith.objectives.distill.student import keep_indices


class BlockOutputs:
    """The hidden states every block of ``model`` output in its latest forward pass.

    Each pass overwrites the last one's, so at most one batch's states are held.
    """

    def __init__(self, model: nn.Module) -> None:
        stacks = discover_layers(model).stacks
        if len(stacks) != 1:
            raise ConfigError(
                f"distill.hidden_weight: {type(model).__name__} has {len(stacks)} block "
                "stacks; hidden-state matching needs single-stack models"
            )
        self.blocks = list(model.get_submodule(stacks[0]))
        self.states: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            block.register_forward_hook(self._hook(i))

    def _hook(self, index: int) -> Any:
        def record(hidden: torch.Tensor) -> torch.Tensor:
            self.states[index] = hidden
            return hidden

        def keep(module: nn.Module, args: Any, output: Any) -> None:
            map_hidden(output, record, module)

        return keep

    def take(self) -> dict[int, torch.Tensor]:
        """The captured states (cleared: the next forward fills them again)."""
        states, self.states = self.states, {}
        return states


class LiveTeacher:
    """Runs the teacher on a training batch, once: the last batch's outputs are kept.

    The batch is recognised by its ``input_ids`` tensor object (held, so its
    identity cannot be reused by a later batch).
    """

    def __init__(self, task: Any, model: nn.Module, *, hidden: bool = False) -> None:
        self.task, self.model = task, model.eval().requires_grad_(False)
        self.blocks = BlockOutputs(model) if hidden else None
        self._last: tuple[torch.Tensor, Any, dict[int, torch.Tensor]] | None = None

    def run(self, batch: Mapping[str, torch.Tensor]) -> tuple[Any, dict[int, torch.Tensor]]:
        """The teacher's outputs on ``batch`` and its block outputs (empty without ``hidden``)."""
        ids = batch["input_ids"]
        if self._last is None or self._last[0] is not ids:
            with torch.no_grad():
                out = self.model(**self.task.model_inputs(dict(batch)))
            states = self.blocks.take() if self.blocks is not None else {}
            self._last = (ids, out, states)
        return self._last[1], self._last[2]


def matched_blocks(
    student_blocks: int, teacher_blocks: int, kept: Sequence[int] | None
) -> list[tuple[int, int]]:
    """``(student block, teacher block)`` pairs: the copied blocks, else evenly spaced."""

    if kept is not None:
        return list(enumerate(kept))
    if student_blocks > teacher_blocks:
        raise ConfigError(
            f"distill.hidden_weight: the student has {student_blocks} blocks, the teacher "
            f"only {teacher_blocks}; match a deeper student against a deeper teacher"
        )
    return list(enumerate(keep_indices(teacher_blocks, student_blocks)))


class HiddenTerm:
    """``weight * mean squared difference`` of matched block outputs, per target.

    Args:
        student: The student's block outputs (hooks on the trained model).
        teacher: The live teacher, capturing its block outputs.
        pairs: ``(student block, teacher block)`` pairs.
        task: The run's task (its target count normalises the term like the task loss).
        weight: ``distill.hidden_weight``.
    """

    name = "hidden"
    task_weight = 1.0

    def __init__(
        self,
        student: BlockOutputs,
        teacher: LiveTeacher,
        pairs: Sequence[tuple[int, int]],
        task: Any,
        weight: float,
    ) -> None:
        self.student, self.teacher, self.pairs = student, teacher, list(pairs)
        self.task, self.weight = task, float(weight)

    def loss_sum(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        mine = self.student.take()
        _, theirs = self.teacher.run(batch)
        mask = batch.get("attention_mask")
        losses = []
        for s, t in self.pairs:
            if s not in mine or t not in theirs:
                raise RuntimeError(
                    f"hidden states of student block {s} / teacher block {t} missing"
                )
            losses.append(masked_mse(mine[s], theirs[t].to(mine[s].dtype), mask))
        mean = torch.stack(losses).mean()
        # The loop divides by the batch's targets: scaling by them makes it a plain mean.
        return self.weight * mean * self.task.count_targets(batch).to(mean.dtype)


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens of the squared difference, averaged over the hidden size."""
    per_token = (a - b).pow(2).mean(-1)
    if mask is None:
        return per_token.mean()
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1)
