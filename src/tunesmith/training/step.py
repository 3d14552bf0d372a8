"""Small pure pieces of one optimizer step, kept out of the loop so the step reads as one block.

``Trainer.train_step`` (train/loop.py) is the sequence; what is here computes
one value each (windows of micro-batches, what went non-finite, the log
record) and touches no loop state.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tunesmith.tasks.base import Batch
from tunesmith.training.monitor import rss_mb


@dataclass
class StepStats:
    """Sums over one optimizer step's micro-batches."""

    loss_sum: float
    targets: float
    real_tokens: int
    grad_norm: float | None
    skipped: bool
    #: The norm of each layer group, before clipping (groups without gradients omitted).
    group_norms: dict[str, float] = field(default_factory=dict)
    bad_where: str = ""
    #: The objective's parts of this step (``Objective.take_parts``).
    parts: dict[str, float] = field(default_factory=dict)


def accumulation_windows(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Group micro-batches into accumulation windows (the last may be shorter)."""
    it = iter(batches)
    while window := list(itertools.islice(it, size)):
        yield window


def clip_to(params: Sequence[torch.Tensor], max_norm: float, norm: float) -> bool:
    """Scale ``params``' gradients down to ``max_norm`` when their ``norm`` exceeds it.

    torch's ``clip_grads_with_norm_`` multiplies every gradient by a coefficient
    clamped at 1.0, so an unclipped step still pays a full pass over all
    gradients (on CPU one multiply per tensor, ~5% of a MiniLM step). The
    coefficient is computed here exactly as torch computes it and the pass runs
    only when it is below 1: multiplying by 1.0 changes no bit, so skipping it
    gives the same weights. Returns whether the gradients were scaled.
    """
    norm_t = torch.tensor(norm)
    if float(max_norm / (norm_t + 1e-6)) >= 1.0:
        return False
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm_t)
    return True


def describe_non_finite(loss_sum: float, norms: dict[str, float]) -> str:
    """Which part went non-finite: the loss and/or named layer groups."""
    bad = [name for name, value in norms.items() if not math.isfinite(value)]
    groups = ", ".join(bad)
    if not math.isfinite(loss_sum):
        return f"loss is {loss_sum}" + (f"; gradients of {groups}" if bad else "")
    return f"non-finite gradients in layer group(s) {groups or '?'}"


def train_record(
    step: int,
    epochs: float,
    loss: float,
    param_groups: Sequence[dict[str, Any]],
    grad_norm: float | None,
    group_norms: dict[str, float],
    tok_s: float,
) -> dict[str, Any]:
    """The ``train`` line of ``metrics.jsonl`` (keys in the order readers have always seen)."""
    record: dict[str, Any] = {
        "step": step,
        "epoch": round(epochs, 4),
        "split": "train",
        "loss": loss,
    }
    for group in param_groups:  # decay/no-decay halves share one LR
        record.setdefault(f"lr/{group.get('group', group['name'])}", group["lr"])
    if grad_norm is not None:
        record["grad_norm"] = grad_norm
    for name, value in group_norms.items():
        record[f"grad_norm/{name}"] = value
    record["tokens_per_s"] = tok_s
    record["rss_mb"] = round(rss_mb(), 1)
    return record


def short_metrics(metrics: dict[str, Any], names: tuple[str, ...]) -> str:
    """``loss`` and the task's headline metrics, for the one log line per evaluation."""
    keys = ["loss", *names]
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)
