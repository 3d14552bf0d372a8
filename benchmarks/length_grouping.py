"""Length grouping against random batches: padding, speed and accuracy over seeds.

Two data sets, both from the shipped Rotten Tomatoes reviews, MiniLM-L6, batch
16, 2 epochs, the settings of ``examples/sentiment.yaml`` otherwise:

* ``demo``: the sentiment demo with its training split capped at ``--rows``
  reviews (800: the size where one 50-batch window covered the epoch);
* ``length-labelled``: a constructed 3-class set where length predicts the
  label: ``fresh`` (one fresh review), ``rotten`` (one rotten review) and
  ``mixed`` (a fresh and a rotten review joined, so about twice as long);
  ``--rows`` training rows, 150 validation, 900 test, built with a fixed seed
  from reviews no two splits share.

Three arms; the arms of a seed run back to back (machine load drifts alike for
all three):

* ``random``: ``data.group_by_length=false``;
* ``window 50``: ``data.length_window=50``, the fixed window the sampler had
  before it adapted to the data size and the label;
* ``adaptive``: the default (size rule, then the label check).

Padding is replayed from the run's own sampler (``Task.train_sampler`` on the
run's training features, both epochs), also for the whole demo training set;
real (non-pad) tokens/s comes from each run's summary. Accuracy is the final
model's on the test split (no checkpoint selection: evaluation runs once, at
the end); per-seed differences to ``random`` pair runs with the same seed
(same training rows and initial head). Where an arm's training order equals
the ``random`` arm's for both epochs (the label check chose random batches),
that run is the same computation and is not repeated: its numbers are the
``random`` run's.

    python benchmarks/length_grouping.py [--seeds 5] [--rows 800] [--threads 1]

Runs whose ``summary.json`` exists are not repeated (delete the folder to rerun).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _runs import CONFIG, ROOT

from tunesmith.studies.bench.measure import machine_info

ARMS: dict[str, list[str]] = {
    "random": ["data.group_by_length=false"],
    "window 50": ["data.length_window=50"],
    "adaptive": [],
}
COMMON = [
    "train.epochs=2",
    "train.eval_steps=100000",  # evaluated once, after training: the final model
    "train.save_minutes=null",
    "train.overwrite=true",
    "data.split_seed=0",  # one validation/test split for every seed
]
#: The demo's held-out splits: a small validation split (nothing is selected on
#: it), the demo's 10% test split.
DEMO = ["data.validation_fraction=0.02", "data.test_fraction=0.1"]
#: Rows of the constructed set's held-out splits.
HELD_OUT = {"validation": 150, "test": 900}
CLASSES = ("fresh", "rotten", "mixed")


# -- the constructed set ---------------------------------------------------------
def demo_reviews() -> dict[str, list[str]]:
    """Every cleaned review of the demo data by label (fresh, rotten), in file order."""
    from tunesmith.config.root import Config
    from tunesmith.tasks.base import get_task

    splits = get_task(Config.load(CONFIG, [])).load_splits()
    by_label: dict[str, list[str]] = {"fresh": [], "rotten": []}
    for record in [*splits.train, *splits.validation, *splits.test]:
        by_label[record["label"]].append(record["text"])
    return by_label


def length_labelled_rows(
    reviews: dict[str, list[str]], sizes: dict[str, int], seed: int = 0
) -> dict[str, list[dict[str, str]]]:
    """The 3-class rows of each split; every review is used at most once overall."""
    rng = random.Random(seed)
    pools = {label: rng.sample(texts, len(texts)) for label, texts in reviews.items()}
    out = {}
    for split, size in sizes.items():
        rows = []
        for i in range(size):
            label = CLASSES[i % 3]
            if label == "mixed":
                pair = [pools["fresh"].pop(), pools["rotten"].pop()]
                rng.shuffle(pair)
                rows.append({"text": " ".join(pair), "label": label})
            else:
                rows.append({"text": pools[label].pop(), "label": label})
        rng.shuffle(rows)
        out[split] = rows
    return out


def write_length_labelled(folder: Path, rows: int) -> list[str]:
    """Write the constructed set's CSV files; the overrides that train on them."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = length_labelled_rows(demo_reviews(), {"train": rows, **HELD_OUT})
    for split, records in splits.items():
        with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(records)
    return [
        *(f"data.{split}={folder / f'{split}.csv'}" for split in splits),
        "data.label_column=label",
        "data.labels=null",
        "data.max_length=96",  # a joined pair of reviews is rarely cut
    ]


# -- padding, replayed from the run's sampler -----------------------------------
class _Lines(logging.Handler):
    """Keeps the messages logged while it is attached (the sampler's decision)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def replay_orders(data: list[str], seed: int, epochs: int = 2) -> dict[str, dict[str, Any]]:
    """Each arm's training order for ``seed``, drawn as its run draws it, with its padding.

    The arms differ in their sampler only, so the training features are encoded once.
    """
    from tunesmith.config.root import Config
    from tunesmith.tasks.base import get_task

    features: list[dict[str, Any]] | None = None
    out = {}
    for arm, overrides in ARMS.items():
        cfg = Config.load(CONFIG, [*COMMON, *data, *overrides, f"train.seed={seed}"])
        task = get_task(cfg)
        features = features or _training_features(cfg, task)
        out[arm] = _replay(cfg, task, features, epochs)
    return out


def _training_features(cfg: Any, task: Any) -> list[dict[str, Any]]:
    from tunesmith.models.loading import load_tokenizer

    splits = task.load_splits()
    label2id = {label: i for i, label in enumerate(splits.labels)}
    return task.encode(splits.train, load_tokenizer(cfg.model.name_or_path), label2id)


def _replay(cfg: Any, task: Any, features: list[dict[str, Any]], epochs: int) -> dict[str, Any]:
    """The sampler's orders over ``epochs``, padding share, window and the decision it logged."""
    from tunesmith.data.batching import padded_tokens

    lines, logger = _Lines(), logging.getLogger("tunesmith.tasks.base")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        sampler = task.train_sampler(
            features,
            cfg.train.batch_size,
            group_by_length=cfg.data.group_by_length,
            seed=cfg.train.seed,
        )
    finally:
        logger.removeHandler(lines)
    orders = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        orders.append(sampler.order())
    batch = cfg.train.batch_size
    padded = sum(padded_tokens(order, sampler.lengths, batch) for order in orders)
    return {
        "orders": orders,
        "padding": 1 - epochs * sum(sampler.lengths) / padded,
        "window": sampler.window if sampler.group_by_length else 1,
        "log": lines.lines,
    }


# -- runs and the table ------------------------------------------------------------
def run_arms(
    name: str, data: list[str], seeds: int, out: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    """Every arm over ``seeds`` seeds on one data set: padding, speed, accuracy."""
    arms: dict[str, Any] = {arm: {"runs": [], "padding": []} for arm in ARMS}
    for seed in range(seeds):
        replayed = replay_orders(data, seed)
        orders = {arm: replay.pop("orders") for arm, replay in replayed.items()}
        for arm, overrides in ARMS.items():
            same = arm != "random" and orders[arm] == orders["random"]
            folder = out / name / f"{arm.replace(' ', '-')}-seed{seed}"
            if same:  # the random arm's run, step for step
                summary = {**arms["random"]["runs"][-1], "same_order_as": "random"}
            else:
                settings = [*COMMON, *data, *overrides, f"train.seed={seed}"]
                summary = _summary(folder) or train_once(settings, folder)
            arms[arm]["padding"].append(replayed[arm])
            arms[arm]["runs"].append(summary)
            say(f"{name} / {arm} / seed {seed}: {_brief(summary)}")
    return arms


def train_once(overrides: list[str], folder: Path) -> dict[str, Any]:
    """Train ``examples/sentiment.yaml`` with ``overrides`` in this process; its summary."""
    from tunesmith.api import Config, train

    try:
        train(Config.load(CONFIG, [*overrides, f"train.output_dir={folder}"]), progress=False)
    except Exception as err:  # a failed run is a row of the table, not the end of the benchmark
        return {"error": f"{type(err).__name__}: {err}"}
    return json.loads((folder / "summary.json").read_text())


def _summary(folder: Path) -> dict[str, Any] | None:
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _brief(summary: dict[str, Any]) -> str:
    if "error" in summary:
        return f"failed: {summary['error']}"
    return (
        f"test accuracy {100 * summary['test']['accuracy']:.1f}%, "
        f"{summary['real_tokens_per_s']:,.0f} real tokens/s"
    )


def _accuracies(arm: dict[str, Any]) -> list[float]:
    return [100 * r["test"]["accuracy"] for r in arm["runs"]]


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per data set and arm."""
    lines = [
        "| data | batches | window (batches) | padding | padding saving kept | real tokens/s | "
        "test accuracy, mean ± sd | vs random, per seed (pts) | mean vs random |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arms in results.items():
        if any("error" in r for arm in arms.values() for r in arm["runs"]):
            lines.append(f"| {name} | a run failed: see results.json | | | | | | | |")
            continue
        base = _accuracies(arms["random"])
        shares = {
            arm: statistics.mean(p["padding"] for p in res["padding"]) for arm, res in arms.items()
        }
        for arm, res in arms.items():
            accs = _accuracies(res)
            label = f"{arm} (= random)" if all("same_order_as" in r for r in res["runs"]) else arm
            diffs = [a - b for a, b in zip(accs, base, strict=True)]
            windows = sorted({p["window"] for p in res["padding"]})
            padding = shares[arm]
            speed = statistics.mean(r["real_tokens_per_s"] for r in res["runs"])
            lines.append(
                f"| {name} | {label} | {'/'.join(map(str, windows))} | {padding:.1%} | "
                f"{_kept(shares, arm):.0%} | "
                f"{speed:,.0f} | {statistics.mean(accs):.1f}% ± {statistics.stdev(accs):.1f} | "
                f"{', '.join(f'{d:+.1f}' for d in diffs) if arm != 'random' else '-'} | "
                f"{f'{statistics.mean(diffs):+.2f}' if arm != 'random' else '-'} |"
            )
    return "\n".join(lines)


def _kept(shares: dict[str, float], arm: str) -> float:
    """Share of the fixed 50-batch window's padding saving (over random batches) an arm keeps."""
    saved = shares["random"] - shares["window 50"]
    return (shares["random"] - shares[arm]) / saved if saved else float("nan")


def full_demo_padding() -> dict[str, dict[str, Any]]:
    """Padding of each arm on the demo's whole training split (seed 0): no training."""
    replayed = replay_orders([], seed=0)
    for replay in replayed.values():
        del replay["orders"]
    return replayed


def padding_table(full: dict[str, dict[str, Any]]) -> str:
    """Markdown: the whole demo training set, each arm's padding and saving kept."""
    shares = {arm: p["padding"] for arm, p in full.items()}
    lines = ["| whole demo training set | window (batches) | padding | padding saving kept |"]
    lines.append("|---|---|---|---|")
    for arm, p in full.items():
        lines.append(f"| {arm} | {p['window']} | {p['padding']:.1%} | {_kept(shares, arm):.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=800, help="training rows of each data set")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "length_grouping")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run; on a shared 2-core machine two threads contending with "
        "other work made a training step 5-7x slower than one",
    )
    args = parser.parse_args()
    COMMON.append(f"train.num_threads={args.threads}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = {
        "demo": [*DEMO, f"data.max_train_samples={args.rows}"],
        "length-labelled": write_length_labelled(args.out / "data", args.rows),
    }
    machine = machine_info()
    print(
        f"cpu: {machine['cpu']} ({machine['cpu_capability']}), threads: "
        f"{machine['torch_threads']}, load average: {machine['load_average']}",
        flush=True,
    )
    started = time.perf_counter()
    full = full_demo_padding()
    results = {
        name: run_arms(name, overrides, args.seeds, args.out, lambda s: print(s, flush=True))
        for name, overrides in data.items()
    }
    decisions = {name: arms["adaptive"]["padding"][0]["log"] for name, arms in results.items()}
    machine["load_average_after"] = machine_info()["load_average"]
    machine["minutes"] = round((time.perf_counter() - started) / 60, 1)
    record = {"machine": machine, "full_demo": full, "results": results, "decisions": decisions}
    (args.out / "results.json").write_text(json.dumps(record, indent=1))
    print(table(results), padding_table(full), sep="\n\n")
    for name, logged in decisions.items():
        print(f"{name}: {' / '.join(logged)}")
    print(f"{machine['minutes']} minutes; load average after: {machine['load_average_after']}")


if __name__ == "__main__":
    main()
