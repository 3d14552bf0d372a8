"""Where a training step's time goes: torch's profiler over N optimizer steps, by kind of op.

Trains ``examples/sentiment.yaml`` (full fine-tuning of MiniLM-L6 by default)
in this process with torch's profiler on for ``--active`` optimizer steps
after ``--skip`` warm-up steps, and sums the ops' own CPU time into kinds:
matrix multiplies, the optimizer, normalisation, attention, activation
functions, the embedding update, copies and the rest. The matmul FLOPs the
profiler counts, over the profiled wall time, against the measured fp32
matmul peak give the share of the peak the step reaches.

    python benchmarks/profile_step.py [--active 20] [--threads 2] [overrides ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from _runs import CONFIG
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, schedule

from tunesmith.studies.bench.measure import matmul_peak_flops

#: Op-name fragments of each kind, first match wins (names are aten's).
KINDS: list[tuple[str, tuple[str, ...]]] = [
    ("matrix multiply", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("optimizer", ("adam", "_foreach")),
    ("attention", ("attention", "softmax")),
    ("normalisation", ("layer_norm",)),
    ("activation", ("gelu", "silu", "tanh", "relu")),
    ("embedding", ("embedding",)),
    ("copies", ("copy_", "contiguous", "clone", "to_copy", "cat", "index")),
    ("reductions", ("sum", "mean", "norm")),
    ("element-wise", ("add", "mul", "div", "sub", "where", "fill", "zero", "dropout")),
]


def kind(name: str) -> str:
    """The kind an op belongs to ("other" when no fragment matches)."""
    low = name.lower()
    return next((k for k, parts in KINDS if any(p in low for p in parts)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", type=int, default=5, help="steps before profiling")
    parser.add_argument("--active", type=int, default=20, help="profiled steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from tunesmith.api import Config, train

    torch.set_num_threads(args.threads)
    peak = matmul_peak_flops(threads=args.threads)
    steps = args.skip + args.active + 1
    timing: dict[str, float] = {}

    def on_step(prof: profile) -> None:
        prof.step()
        done = prof.step_num
        if done == args.skip:
            timing["start"] = time.perf_counter()
        elif done == args.skip + args.active:
            timing["stop"] = time.perf_counter()

    with (
        tempfile.TemporaryDirectory() as out,
        profile(
            activities=[ProfilerActivity.CPU],
            schedule=schedule(wait=args.skip - 1, warmup=1, active=args.active),
            with_flops=True,
        ) as prof,
    ):
        handle = register_optimizer_step_post_hook(lambda *_: on_step(prof))
        try:
            cfg = Config.load(
                CONFIG,
                [
                    f"train.max_steps={steps}",
                    f"train.num_threads={args.threads}",
                    "train.eval_steps=100000",
                    "train.save_minutes=null",
                    f"train.output_dir={Path(out) / 'run'}",
                    *args.overrides,
                ],
            )
            train(cfg, progress=False)
        finally:
            handle.remove()
    wall = timing["stop"] - timing["start"]
    by_kind: dict[str, float] = defaultdict(float)
    flops = 0.0
    for event in prof.key_averages():
        by_kind[kind(event.key)] += event.self_cpu_time_total / 1e6
        if kind(event.key) == "matrix multiply":
            flops += event.flops or 0
    profiled = sum(by_kind.values())
    print(
        f"{args.active} steps, {wall:.2f} s wall ({wall / args.active:.3f} s/step), "
        f"ops' own CPU time {profiled:.2f} s; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s"
    )
    print("| kind | s (ops' own CPU time) | share |\n|---|---|---|")
    for name, seconds in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {seconds:.2f} | {seconds / profiled:.0%} |")
    print(
        f"matmul: {flops / 1e9:.1f} GFLOP in {wall:.2f} s = {flops / wall / 1e9:.1f} GFLOP/s, "
        f"{flops / wall / peak:.0%} of the peak"
    )
    print("top ops:")
    for event in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"  {event.key:45s} {event.self_cpu_time_total / 1e6:7.2f} s  x{event.count}")


if __name__ == "__main__":
    main()
