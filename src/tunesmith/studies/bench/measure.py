"""Measurements both contenders share: FLOPs, matmul peak, machine."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Hashable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


# -- measuring ------------------------------------------------------------------
def trainable_names(model: Any) -> set[str]:
    """Names of the parameters that receive gradients."""
    return {n for n, p in model.named_parameters() if p.requires_grad}


def flops_per_token(model: Any) -> float:
    """Training FLOPs per real token of the block matmuls (formula in the module docstring)."""
    from torch import nn

    from tunesmith.models.layers import discover_layers

    stacks = tuple(s + "." for s in discover_layers(model).stacks)
    order = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    first = min((order[id(p)] for p in model.parameters() if p.requires_grad), default=len(order))
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith(stacks):
            n = module.weight.numel()
            grads = (order[id(module.weight)] > first) + module.weight.requires_grad
            total += 2 * n * (1 + grads)  # forward, activation and weight gradients
    return float(total)


def matmul_peak_flops(n: int = 2048, reps: int = 5, threads: int | None = None) -> float:
    """Best fp32 ``torch.mm`` FLOP/s on ``threads`` (default: torch's) threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out, best = torch.mm(a, b), float("inf")  # the first call warms up
        for _ in range(reps):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return 2 * n**3 / best


def grouped_padded_tokens(
    lengths: list[int],
    batch_size: int,
    seed: int,
    epochs: int,
    labels: list[Hashable] | None = None,
) -> int:
    """Padded tokens of tunesmith's length-grouped batches (its sampler's order, replayed).

    ``labels`` are the training labels: with them the window is the one a
    classification run chooses after its label check, not the size rule alone.
    """
    from tunesmith.data.batching import EpochSampler, padded_tokens
    from tunesmith.tasks.grouping import choose_window

    window = choose_window(lengths, labels, batch_size).window
    sampler, total = EpochSampler(lengths, batch_size, seed=seed, window=window), 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        total += padded_tokens(sampler.order(), lengths, batch_size)
    return total


def machine_info() -> dict[str, Any]:
    """CPU, cores, SIMD level, load, date and library versions: what the numbers depend on."""
    import importlib.metadata as md

    import torch

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    models = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": models[0] if models else platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "load_average": [round(x, 2) for x in load],
        "python": platform.python_version(),
    }
    for pkg in ("torch", "transformers", "peft", "accelerate", "datasets", "tunesmith"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = "not installed"
    return info


# -- orchestration ----------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
