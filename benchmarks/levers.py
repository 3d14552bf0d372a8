"""The measured effect of each speed/memory switch of ``train`` (docs/benchmarks.md).

Every lever is one config override of ``examples/sentiment.yaml`` (MiniLM-L6,
Rotten Tomatoes), trained in its own process on the same rows, split, seed and
batch size; the table shows real tokens/s, seconds per epoch, peak RSS and
test accuracy next to the run it changes.

    python benchmarks/levers.py [--rows 2000] [--out runs/levers] [--only a,b]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _runs import ROOT, train_run

_FULL = ["method.name=full", "optim.lr=5e-5"]
_TOP2 = ["method.name=freeze", "method.train_layers=2", "optim.lr=2e-4", "train.epochs=3"]

#: name -> (overrides, the lever's baseline)
LEVERS: dict[str, tuple[list[str], str | None]] = {
    "full": (_FULL, None),
    "full no-grouping": ([*_FULL, "data.group_by_length=false"], "full"),
    "full checkpointing": ([*_FULL, "train.gradient_checkpointing=true"], "full"),
    "top2x3 cache-off": ([*_TOP2, "train.feature_cache=off"], None),
    "top2x3 cache": (
        [*_TOP2, "train.feature_cache=memory"],
        "top2x3 cache-off",
    ),
    "full compile": ([*_FULL, "train.compile=true"], "full"),
}


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per lever, with its speed and memory relative to its baseline."""
    lines = [
        "| run | real tokens/s | s / epoch | peak RSS MiB | test accuracy | vs baseline |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in results.items():
        if "error" in s:
            lines.append(f"| {name} | failed: {s['error'][:80]} | | | | |")
            continue
        base = results.get(LEVERS[name][1] or "", {})
        versus = "-"
        if base and "error" not in base:
            speed = s["real_tokens_per_s"] / base["real_tokens_per_s"]
            memory = s["peak_rss_mb"] / base["peak_rss_mb"]
            versus = f"{speed:.2f}x speed, {memory:.2f}x memory"
        lines.append(
            f"| {name} | {s['real_tokens_per_s']:,.0f} | {s['seconds_per_epoch']:.0f} | "
            f"{s['peak_rss_mb']:,.0f} | {100 * s['test']['accuracy']:.1f}% | {versus} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="training rows")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "levers")
    parser.add_argument("--only", default=",".join(LEVERS), help="comma-separated lever names")
    args = parser.parse_args()
    common = [f"data.max_train_samples={args.rows}", "train.precision=fp32"]
    common += ["train.eval_steps=1000000", "train.early_stopping_patience=null"]
    print(f"cpu: {torch.backends.cpu.get_cpu_capability()}, threads: {torch.get_num_threads()}")
    results = {}
    for i, name in enumerate(n.strip() for n in args.only.split(",")):
        overrides = [*common, *LEVERS[name][0]]
        results[name] = train_run(overrides, args.out / f"lever-{i}")
        print(f"{name}: {json.dumps(results[name])[:160]}", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
