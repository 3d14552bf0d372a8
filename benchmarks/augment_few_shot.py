"""Does augmentation help a 64-examples-per-class model? examples/few_shot_rt.yaml, 3 seeds.

Arms (same held-out test reviews, same K-shot sample and initialisation per seed):

* ``none``: the 128 reviews alone;
* ``eda``: 4 EDA copies per review (WordNet synonyms), the example's settings;
* ``eda+mask``: the same plus dynamic masking of 10% of tokens, re-drawn each epoch.

Every arm trains the same number of epochs over its data, so the augmented arms take
more steps; ``none-long`` trains the 128 reviews for as many steps as ``eda`` took, so
the gain is not just more updates. Each run is skipped when its summary.json exists.

Run: ``nice -n 10 python benchmarks/augment_few_shot.py [arm ...]``; results go to
``runs/few_shot/results.json`` and a markdown table is printed.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "few_shot"
CONFIG = ROOT / "examples" / "few_shot_rt.yaml"
SEEDS = (0, 1, 2)
ARMS = {
    "none": ["data.augment.multiplier=0"],
    "none-long": ["data.augment.multiplier=0", "train.epochs=40", "train.eval_steps=40"],
    "eda": [],
    "eda+mask": ["data.augment.dynamic_masking=0.1"],
}
COMMON = ["train.overwrite=true", "train.save_minutes=null"]


def run(arm: str, seed: int) -> dict[str, Any]:
    """Train one arm with one seed (unless done); its summary.json."""
    from tunesmith.api import train
    from tunesmith.config import Config

    out = OUT / f"{arm}-seed{seed}"
    if not (out / "summary.json").is_file():
        overrides = [*ARMS[arm], *COMMON, f"train.seed={seed}", f"train.output_dir={out}"]
        train(Config.load(CONFIG, overrides), progress=False)
    return json.loads((out / "summary.json").read_text())


def main(arms: list[str]) -> None:
    results: dict[str, Any] = {}
    for arm in arms:
        runs = [run(arm, seed) for seed in SEEDS]
        accs = [r["test"]["accuracy"] for r in runs]
        results[arm] = {
            "test_accuracy": accs,
            "mean": statistics.mean(accs),
            "stdev": statistics.stdev(accs),
            "steps": [r["steps"] for r in runs],
            "train_seconds": [round(r["train_seconds"]) for r in runs],
        }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    print("| arm | test accuracy (seeds 0, 1, 2) | mean ± sd | steps | train s |")
    print("|---|---|---|---|---|")
    for arm, r in results.items():
        accs = " / ".join(f"{a:.1%}" for a in r["test_accuracy"])
        print(
            f"| {arm} | {accs} | {r['mean']:.1%} ± {r['stdev']:.1%} | {r['steps'][0]} | "
            f"{statistics.mean(r['train_seconds']):.0f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:] or list(ARMS))
