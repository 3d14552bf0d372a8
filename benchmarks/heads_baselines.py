"""A multi-label or regression run's test metrics beside the baseline that ignores the text.

Usage::

    tunesmith train examples/multilabel_wnut_types.yaml
    python benchmarks/heads_baselines.py runs/wnut_types
    tunesmith train examples/regression_whissell.yaml
    python benchmarks/heads_baselines.py runs/whissell

The baselines see the same splits as the run (its ``splits.json``):

* multi-label, label frequency: every row scores each label by its share of
  the training rows; thresholds are tuned on validation as the run's are (so
  a label is predicted for every row or for none), then scored on test;
* regression, mean predictor: every row gets the training mean of each target
  (no correlation: Pearson and Spearman 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tunesmith.config.root import Config
from tunesmith.tasks.base import get_task
from tunesmith.tasks.head_metrics import multi_label_metrics, regression_metrics, tune_thresholds


def baseline(run: Path) -> tuple[str, dict[str, float]]:
    """The problem type and the baseline's test metrics for the run in ``run``."""
    cfg = Config.load(run / "config.yaml")
    task = get_task(cfg)
    provenance = json.loads((run / "splits.json").read_text(encoding="utf-8"))
    labels = json.loads((run / "best" / "tunesmith.json").read_text())["labels"]
    label2id = {lab: i for i, lab in enumerate(labels)}
    targets = {
        split: np.array(
            [
                task.head_target(r, label2id)
                for r in task.split_records(provenance, split, run / "splits.json")
            ]
        )
        for split in ("train", "validation", "test")
    }
    constant = targets["train"].mean(axis=0)
    kind = cfg.task.problem_type
    if kind == "regression":
        return kind, regression_metrics(
            np.tile(constant, (len(targets["test"]), 1)), targets["test"], labels
        )
    validation = np.tile(constant, (len(targets["validation"]), 1))
    cuts = tune_thresholds(validation, targets["validation"])
    scores = np.tile(constant, (len(targets["test"]), 1))
    return kind, multi_label_metrics(scores, targets["test"], labels, cuts)


def main(run: Path) -> None:
    kind, base = baseline(run)
    model = json.loads((run / "summary.json").read_text(encoding="utf-8"))["test"]
    if kind == "regression":
        keys = ["rmse", "pearson", "spearman"]
        names = sorted({k.split("/", 1)[1] for k in model if k.startswith("rmse/")})
        keys += [f"{m}/{n}" for n in names for m in ("rmse", "pearson", "spearman")]
        title = "mean predictor"
    else:
        keys = ["micro_f1", "macro_f1", "subset_accuracy"]
        title = "label frequency"
    print(f"{'test metric':24} {'model':>8} {title:>16}")
    for key in keys:
        print(f"{key:24} {model[key]:8.4f} {base[key]:16.4f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
