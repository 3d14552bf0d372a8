"""One config, several layouts: does scaling out train the same model, and what does a step cost?

Trains the sentiment example (MiniLM-L6, a slice of Rotten Tomatoes, fp32,
global batch 16) in one process, then on 2 CPU processes as DDP, FSDP2 and
DeepSpeed ZeRO-2 / ZeRO-3 (batch 8 each), and prints for every layout the
largest weight difference to the one-process run and the training seconds
per optimizer step (``summary.json``). Every layout runs through the
launchers a user runs (``accelerate launch``, ``torchrun``), gloo on CPU.

    python benchmarks/scale_out.py [--rows 256] [--skip deepspeed]

The numbers in docs/scale.md come from this script. Expect the 2-process
layouts to be slower per step on 2 cores: they compete for the same cores
and add communication; the point is the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "sentiment.yaml"
BIN = Path(sys.executable).parent
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"]
ACCELERATE = [str(BIN / "accelerate"), "launch"]
FSDP_CPU = ROOT / "examples" / "accelerate" / "fsdp_cpu.yaml"


def layouts() -> dict[str, tuple[list[str], dict[str, str]]]:
    """Launcher prefix and environment of each layout (one process: none)."""
    cpu = {"ACCELERATE_USE_CPU": "1"}
    ds = {"DS_ACCELERATOR": "cpu", "ACCELERATE_USE_DEEPSPEED": "true"}
    return {
        "1 process": ([sys.executable], {}),
        "DDP": (TORCHRUN, cpu),
        "FSDP2": ([*ACCELERATE, "--config_file", str(FSDP_CPU)], {}),
        "ZeRO-2": (TORCHRUN, {**ds, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}),
        "ZeRO-3": (TORCHRUN, {**ds, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}),
    }


def run(name: str, rows: int, out: Path) -> dict:
    """Train one layout; its summary, or the error's last line."""
    prefix, extra = layouts()[name]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1" if name != "1 process" else "2", **extra)
    batch = 16 if name == "1 process" else 8
    overrides = [
        f"data.max_train_samples={rows}",
        f"train.batch_size={batch}",
        "train.precision=fp32",
        "train.eval_steps=null",
        "train.save_minutes=null",
        "train.feature_cache=off",
        "data.group_by_length=false",
        # No dropout: each process draws its own masks, so with it the layouts
        # could not be compared weight for weight.
        "regularize.hidden_dropout=0",
        "regularize.attention_dropout=0",
        f"train.output_dir={out}",
    ]
    command = [*prefix, "-m", "tunesmith", "train", str(CONFIG), *overrides, "--no-progress"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.splitlines()
        errors = [line for line in lines if "error" in line.lower() and "====" not in line]
        return {"error": (errors or lines or ["failed"])[-1].strip()[:200]}
    return json.loads((out / "summary.json").read_text())


def max_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(a), load_file(b)
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="training rows")
    parser.add_argument("--skip", nargs="*", default=[], help="layouts to leave out")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="scale-out-"))
    results = {}
    for name in layouts():
        if any(s.lower() in name.lower() for s in args.skip):
            continue
        print(f"training: {name}", file=sys.stderr)
        results[name] = run(name, args.rows, tmp / name.replace(" ", "-"))
    reference = tmp / "1-process" / "final" / "model.safetensors"
    print("| layout | max weight difference to 1 process | seconds per step |")
    print("|---|---|---|")
    for name, summary in results.items():
        if "error" in summary:
            print(f"| {name} | failed: {summary['error']} | |")
            continue
        final = tmp / name.replace(" ", "-") / "final" / "model.safetensors"
        diff = "(reference)" if name == "1 process" else f"{max_diff(reference, final):.1e}"
        per_step = summary["train_seconds"] / max(summary["steps"], 1)
        print(f"| {name} | {diff} | {per_step:.3f} |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
