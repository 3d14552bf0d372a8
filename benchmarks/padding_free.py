"""What padding-free batches buy in instruction tuning: ``examples/sft_smollm2.yaml``.

Three runs of the same steps over the same chats (SmolLM2-135M + LoRA, batch
8), each in its own process: random batches padded to their longest chat
(``data.group_by_length=false``, what HF's DataCollatorWithPadding does),
length-grouped padded batches (tunesmith's default), and packed rows
(``data.padding_free=true``). Real (non-pad) tokens/s is the comparable speed:
every run trains on the same real tokens.

    python benchmarks/padding_free.py [--steps 24] [--out runs/padding_free]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "sft_smollm2.yaml"
ARMS = {
    "random batches, padded": ["data.group_by_length=false"],
    "length-grouped, padded": [],
    "padding-free (packed)": ["data.padding_free=true"],
}
#: Training only: no evaluation, test pass or generation in the timed runs.
COMMON = [
    "train.eval_at_start=false",
    "train.eval_steps=100000",
    "data.test_fraction=0",
    "train.overwrite=true",
]


def run(overrides: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "tunesmith", "--quiet", "train", str(CONFIG), *overrides]
    cmd += [*COMMON, f"train.output_dir={out}", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "padding_free")
    args = parser.parse_args()
    results = {}
    args.out.mkdir(parents=True, exist_ok=True)
    for i, (name, overrides) in enumerate(ARMS.items()):
        steps = [f"train.max_steps={args.steps}"]
        results[name] = run([*overrides, *steps], args.out / f"arm{i}")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    base = results["random batches, padded"].get("real_tokens_per_s")
    print("| batches | real tokens/s | s / step | peak RSS MiB | vs random padded |")
    print("|---|---|---|---|---|")
    for name, s in results.items():
        if "error" in s:
            print(f"| {name} | failed: {s['error'][:80]} | | | |")
            continue
        speed = s["real_tokens_per_s"]
        print(
            f"| {name} | {speed:,.0f} | {s['train_seconds'] / s['steps']:.2f} | "
            f"{s['peak_rss_mb']:,.0f} | {speed / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
