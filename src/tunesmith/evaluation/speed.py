"""Inference latency of models on the same batches, measured after warm-up.

Why models take turns on every batch rather than one after the other: on a
shared machine, load from other processes then hits every model alike, so
their ratio stays honest even when the absolute times drift.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from tunesmith.data.batching import Collator


@dataclass
class Latency:
    """Forward-pass times of one model at one batch size (milliseconds)."""

    batch_size: int
    batches: int
    p50_ms: float
    p95_ms: float
    ms_per_example: float
    examples_per_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between order statistics."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def make_batches(
    features: Sequence[Mapping[str, Any]],
    collator: Collator,
    batch_size: int,
    limit: int,
) -> list[dict[str, torch.Tensor]]:
    """Up to ``limit`` padded batches of ``batch_size`` consecutive features."""
    batches = []
    for start in range(0, len(features), batch_size):
        if len(batches) == limit:
            break
        batches.append(collator(list(features[start : start + batch_size])))
    return batches


@torch.no_grad()
def forward_latency(
    models: Mapping[str, nn.Module],
    batches: Sequence[Mapping[str, torch.Tensor]],
    inputs: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]],
    *,
    warmup: int = 2,
) -> dict[str, Latency]:
    """Each model's forward time on ``batches`` (turn by turn), after ``warmup`` untimed passes.

    Args:
        models: Name -> model (put in eval mode here).
        batches: The batches, all of one batch size.
        inputs: The model's keyword arguments from a batch (``task.model_inputs``).
        warmup: Untimed passes per model first (allocations, kernel choice).
    """
    if not batches:
        raise ValueError("no batches to time")
    for model in models.values():
        model.eval()
    for i in range(warmup):
        for model in models.values():
            model(**inputs(dict(batches[i % len(batches)])))
    times: dict[str, list[float]] = {name: [] for name in models}
    examples = 0
    for batch in batches:
        args = inputs(dict(batch))
        examples += int(batch["input_ids"].shape[0])
        for name, model in models.items():
            began = time.perf_counter()
            model(**args)
            times[name].append(time.perf_counter() - began)
    size = int(batches[0]["input_ids"].shape[0])
    return {
        name: Latency(
            batch_size=size,
            batches=len(values),
            p50_ms=round(1000 * statistics.median(values), 3),
            p95_ms=round(1000 * percentile(values, 95), 3),
            ms_per_example=round(1000 * sum(values) / examples, 3),
            examples_per_s=round(examples / sum(values), 1),
        )
        for name, values in times.items()
    }
