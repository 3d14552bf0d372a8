"""Does augmentation help a 64-examples-per-class model? examples/few_shot_rt.yaml, 3 seeds.

Arms (same held-out test reviews, same K-shot sample and initialisation per seed):

* ``none``: the 128 reviews alone;
* ``eda``: 4 EDA copies per review (WordNet synonyms), the example's settings;
* ``eda-short``: the same copies for 2 epochs: about as many steps as ``none`` takes;
* ``mask``: the 128 reviews with dynamic masking of 10% of tokens, re-drawn each epoch;
* ``eda+mask``: ``eda`` plus that masking;
* ``none-long``: the 128 reviews for as many steps as ``eda`` takes (40 epochs).

``eda`` trains 8 epochs over its 5x larger data, so it takes 5x the steps of ``none``;
``eda-short`` and ``none-long`` separate the copies from the extra updates. Each run is
skipped when its summary.json exists.

Run: ``nice -n 10 python benchmarks/augment_few_shot.py [arm ...] [--seeds N]`` (3 seeds by
default); results go to ``runs/few_shot/results-N-seeds.json`` and a markdown table is
printed, with each arm's mean difference to ``none`` over the same seeds.
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
SEEDS = 3
ARMS = {
    "none": ["data.augment.multiplier=0"],
    "eda": [],
    "eda-short": ["train.epochs=2"],
    "mask": ["data.augment.multiplier=0", "data.augment.dynamic_masking=0.1"],
    "eda+mask": ["data.augment.dynamic_masking=0.1"],
    "none-long": ["data.augment.multiplier=0", "train.epochs=40", "train.eval_steps=40"],
}
COMMON = ["train.overwrite=true", "train.save_minutes=null"]


def run(arm: str, seed: int) -> dict[str, Any]:
    """Train one arm with one seed (unless done); its summary.json."""
    from tunesmith.config.root import Config
    from tunesmith.runs.train import train

    out = OUT / f"{arm}-seed{seed}"
    if not (out / "summary.json").is_file():
        overrides = [*ARMS[arm], *COMMON, f"train.seed={seed}", f"train.output_dir={out}"]
        train(Config.load(CONFIG, overrides), progress=False)
    return json.loads((out / "summary.json").read_text())


def main(arms: list[str], seeds: int = SEEDS) -> None:
    results: dict[str, Any] = {}
    for arm in arms:
        runs = [run(arm, seed) for seed in range(seeds)]
        accs = [r["test"]["accuracy"] for r in runs]
        results[arm] = {
            "test_accuracy": accs,
            "mean": statistics.mean(accs),
            "stdev": statistics.stdev(accs),
            "steps": [r["steps"] for r in runs],
            "train_seconds": [round(r["train_seconds"]) for r in runs],
        }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"results-{seeds}-seeds.json").write_text(json.dumps(results, indent=2))
    print(f"| arm | test accuracy (seeds 0-{seeds - 1}) | mean ± sd | vs none (paired) | steps |")
    print("|---|---|---|---|---|")
    for arm, r in results.items():
        accs = " / ".join(f"{100 * a:.1f}" for a in r["test_accuracy"])
        print(
            f"| {arm} | {accs} | {r['mean']:.1%} ± {r['stdev']:.1%} | "
            f"{paired(results, arm)} | {r['steps'][0]} |"
        )


def paired(results: dict[str, Any], arm: str) -> str:
    """Mean difference to ``none`` over the same seeds (same K-shot sample and initialisation),
    with how many seeds it wins; the seed-to-seed spread cancels in the pairs."""
    if arm == "none" or "none" not in results:
        return ""
    ours, base = results[arm]["test_accuracy"], results["none"]["test_accuracy"]
    diffs = [a - b for a, b in zip(ours, base, strict=True)]
    wins = sum(d > 0 for d in diffs)
    return f"{100 * statistics.mean(diffs):+.2f} pt (better in {wins}/{len(diffs)})"


if __name__ == "__main__":
    args = sys.argv[1:]
    count = SEEDS
    if "--seeds" in args:
        at = args.index("--seeds")
        count = int(args[at + 1])
        del args[at : at + 2]
    main(args or list(ARMS), count)
