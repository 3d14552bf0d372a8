"""Every adaptation method on the demo data: accuracy, trainable %, time, memory, size.

Runs ``tunesmith train`` once per method, each in its own process (so peak
memory is per method), on the same data, split, seed, epochs and batch size,
then prints a Markdown table from each run's ``summary.json``. The learning
rate is per method (adapters need larger ones); it is printed in the table.

    python benchmarks/methods_table.py [--out runs/methods] [--only lora,full]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _runs import ROOT, train_run

#: LoRA on every linear layer of the blocks: within 2 points of full fine-tuning here,
#: where the default query/value targets stayed 2.4 points behind.
_ALL_LINEAR = "method.target_modules=[query,key,value,dense]"

#: name -> overrides of examples/sentiment.yaml
METHODS: dict[str, list[str]] = {
    "full": ["method.name=full", "optim.lr=5e-5"],
    "top2": ["method.name=freeze", "method.train_layers=2", "optim.lr=2e-4"],
    "lora": ["method.name=lora", "method.r=8", _ALL_LINEAR, "optim.lr=1e-3"],
    "dora": ["method.name=dora", "method.r=8", _ALL_LINEAR, "optim.lr=1e-3"],
    "ia3": ["method.name=ia3", "optim.lr=5e-3"],
    "prefix": ["method.name=prefix", "method.num_virtual_tokens=20", "optim.lr=5e-3"],
    "bottleneck": ["method.name=bottleneck", "method.reduction_factor=16", "optim.lr=1e-3"],
}


def run(name: str, out: Path) -> dict:
    """Train one method in a subprocess; returns its summary."""
    return train_run(METHODS[name], out / name)


def table(results: dict[str, dict]) -> str:
    """Markdown table of the summaries."""
    lines = [
        "| method | lr | test accuracy | trainable % | s / epoch | peak RSS MiB | checkpoint MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in results.items():
        lr = next(o.split("=", 1)[1] for o in METHODS[name] if o.startswith("optim.lr="))
        if "error" in s:
            lines.append(f"| {name} | {lr} | failed: {s['error']} | | | | |")
            continue
        lines.append(
            f"| {name} | {lr} | {100 * s['test']['accuracy']:.1f}% | "
            f"{s['trainable_percent']:.2f} | {s['seconds_per_epoch']:.0f} | "
            f"{s['peak_rss_mb']:.0f} | {s['checkpoint_weights_mb']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "methods")
    parser.add_argument("--only", default=",".join(METHODS), help="comma-separated methods")
    args = parser.parse_args()
    print(f"cpu: {torch.backends.cpu.get_cpu_capability()}, threads: {torch.get_num_threads()}")
    results = {}
    for name in args.only.split(","):
        results[name] = run(name, args.out)
        print(f"{name}: {json.dumps(results[name].get('test', results[name]))[:120]}", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
