"""The losses/regularisation/distillation experiments of docs/benchmarks.md (MiniLM, offline).

Stages (each skipped when its run folder already has a summary.json):

* ``teacher``: MiniLM-L6 fine-tuned on 4,000 Rotten Tomatoes reviews (examples/sentiment.yaml);
* ``distill``: a 3-block student made from the teacher, distilled (and, as a control,
  the same student trained on the labels only); accuracy and CPU latency of both models;
* ``forgetting``: WNUT-16 NER (1,000 sentences, one epoch) learned from the sentiment
  model, plain vs EWC; sentiment
  accuracy before/after through the sentiment head (retention);
* ``imbalance``: a 10%-fresh subset (2,000 training reviews, top 2 blocks trained);
  cross-entropy vs focal vs inverse class weights (macro-F1 on a test set with the same skew).

Run: ``nice -n 10 python benchmarks/losses_demo.py [stage ...]`` (``forgetting=LAMBDA[:EPOCHS]``
picks EWC's lambda and the NER epochs; 0: the plain run only, negative: the EWC run
only); results go to
``runs/losses/results.json``.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "losses"
EXAMPLES = ROOT / "examples"
SMALL = [
    "data.max_train_samples=4000",
    "train.save_minutes=null",
    "train.overwrite=true",
    "train.num_threads=1",  # a shared, busy 2-core machine: no thread oversubscription
]


def run(name: str, config: Path, overrides: list[str]) -> dict[str, Any]:
    """Train ``config`` into runs/losses/<name> (unless done); its summary.json."""
    from tunesmith.config.root import Config
    from tunesmith.runs.train import train

    out = OUT / name
    if not (out / "summary.json").is_file():
        cfg = Config.load(config, [*overrides, f"train.output_dir={out}"])
        train(cfg, progress=False)
    return json.loads((out / "summary.json").read_text())


def latency(checkpoints: dict[str, Path], texts: list[str], sizes=(1, 32)) -> dict[str, dict]:
    """Median ms per example of the forward pass, per model and batch size (1 thread).

    The models take turns on every batch, so load from other processes on the
    machine hits them alike.
    """
    from tunesmith.runs.train import load_checkpoint

    models = {}
    for name, folder in checkpoints.items():
        _, _, model, tokenizer, _ = load_checkpoint(folder)
        models[name] = model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, dict[int, list[float]]] = {n: {bs: [] for bs in sizes} for n in models}
    with torch.no_grad():
        for bs in sizes:
            for start in range(0, min(len(texts), 30 * bs), bs):
                chunk = texts[start : start + bs]
                batch = tokenizer(
                    chunk, padding=True, truncation=True, max_length=64, return_tensors="pt"
                )
                for name, model in models.items():
                    began = time.perf_counter()
                    model(**batch)
                    times[name][bs].append((time.perf_counter() - began) / len(chunk))
    torch.set_num_threads(threads)
    return {
        name: {
            f"ms_per_example_bs{bs}": round(1000 * statistics.median(v), 3) for bs, v in t.items()
        }
        for name, t in times.items()
    }


def teacher() -> dict:
    return run("teacher", EXAMPLES / "sentiment.yaml", SMALL)


def distill(results: dict) -> None:
    teacher_dir = OUT / "teacher" / "best"
    common = [*SMALL, f"distill.teacher={teacher_dir}"]
    config = EXAMPLES / "after_sentiment" / "distill_student.yaml"
    kd = run("student_kd", config, common)
    t = json.loads((OUT / "teacher" / "summary.json").read_text())
    speed = latency(
        {"teacher": teacher_dir, "student_kd": OUT / "student_kd" / "best"}, _test_texts()
    )
    results["distill"] = {
        "teacher": {"test": _short(t["test"]), **speed["teacher"]},
        "student_kd": {"test": _short(kd["test"]), **speed["student_kd"]},
    }
    acc = results["distill"]
    acc["kept_accuracy"] = round(acc["student_kd"]["test"]["accuracy"] / t["test"]["accuracy"], 4)
    acc["latency_ratio_bs1"] = round(
        acc["student_kd"]["ms_per_example_bs1"] / acc["teacher"]["ms_per_example_bs1"], 3
    )


def control(results: dict) -> None:
    """The same 3-block student trained on the labels only (alpha 0): what KD adds."""
    common = [*SMALL, f"distill.teacher={OUT / 'teacher' / 'best'}", "distill.alpha=0.0"]
    ce = run("student_ce", EXAMPLES / "after_sentiment" / "distill_student.yaml", common)
    results.setdefault("distill", {})["student_ce"] = {"test": _short(ce["test"])}


def _test_texts() -> list[str]:
    """The first 640 test reviews of the teacher's run (its splits.json rows)."""
    from tunesmith.runs.train import load_checkpoint

    _, task, *_ = load_checkpoint(OUT / "teacher" / "best")
    provenance = json.loads((OUT / "teacher" / "splits.json").read_text())
    records = task.split_records(provenance, "test", "splits.json")
    return [r["text"] for r in records[:640]]


def forgetting(results: dict, ewc: float, epochs: int = 1) -> None:
    config = EXAMPLES / "after_sentiment" / "ner_ewc.yaml"
    ref = OUT / "teacher" / "best"
    common = [
        "train.save_minutes=null",
        "train.overwrite=true",
        "train.num_threads=1",
        f"model.name_or_path={ref}",
        f"forgetting.reference_checkpoint={ref}",
        "forgetting.reference_samples=500",
        "forgetting.fisher_samples=200",
        f"train.epochs={epochs}",
        "data.max_train_samples=1000",
    ]
    out = {}
    # "Plain" has EWC at 1e-9 (no effect): its Fisher is computed only so that
    # loss/ewc / 1e-9 logs sum F (theta - theta_ref)^2, which calibrates lambda.
    tag = f"_e{epochs}" if epochs != 1 else ""
    plain = [] if ewc < 0 else [(f"ner_plain{tag}", 1e-9)]  # negative: the EWC run only
    runs = plain + ([(f"ner_ewc_{abs(ewc):g}{tag}", abs(ewc))] if ewc else [])
    for name, lam in runs:
        summary = run(name, config, [*common, f"forgetting.ewc={lam}"])
        out[name] = {"test": _short(summary["test"]), "forgetting": summary["forgetting"]}
    results.setdefault("forgetting", {}).update(out)


def imbalance(results: dict) -> None:
    data = OUT / "data"
    if not (data / "train.csv").is_file():
        _imbalanced_split(data)
    common = [
        "train.save_minutes=null",
        "train.overwrite=true",
        "train.num_threads=1",
        f"data.train={data / 'train.csv'}",
        f"data.validation={data / 'validation.csv'}",
        f"data.test={data / 'test.csv'}",
        "data.text_column=text",
        "data.label_column=label",
        # The top 2 blocks train on the cached output of the frozen 4 (a small CPU budget).
        "method.name=freeze",
        "method.train_layers=2",
        "optim.lr=2e-4",
    ]
    config = EXAMPLES / "imbalanced_focal.yaml"
    variants = {
        "cross_entropy": ["loss.type=cross_entropy", "loss.class_weights=null"],
        "focal": ["loss.class_weights=null"],
        "inverse_weights": ["loss.type=cross_entropy", "loss.class_weights=inverse"],
        "focal_inverse": [],  # the example as written: focal and inverse weights
    }
    results["imbalance"] = {
        name: _short(run(f"imbalance_{name}", config, [*common, *extra])["test"])
        for name, extra in variants.items()
    }


def _imbalanced_split(folder: Path) -> None:
    """10% fresh (the positive class) in every split; the rest rotten."""
    import csv

    from tunesmith.assets.locate.locate import ROTTEN_TOMATOES, locate

    from tunesmith.data.loading import load_records

    source = str(locate(ROTTEN_TOMATOES))
    rows = load_records(source, text_column="text", label_column="category", dropped=[])
    rng = random.Random(0)
    rng.shuffle(rows)
    fresh = [r for r in rows if r["label"] == "fresh"]
    rotten = [r for r in rows if r["label"] == "rotten"]
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {"train": (200, 1800), "validation": (50, 450), "test": (100, 900)}
    for split, (n_fresh, n_rotten) in sizes.items():
        part = fresh[:n_fresh] + rotten[:n_rotten]
        fresh, rotten = fresh[n_fresh:], rotten[n_rotten:]
        rng.shuffle(part)
        with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows({"text": r["text"], "label": r["label"]} for r in part)


def _short(metrics: dict) -> dict:
    keys = ("accuracy", "macro_f1", "f1/fresh", "recall/fresh", "entity_f1", "loss")
    return {k: round(metrics[k], 4) for k in keys if k in metrics}


def main(stages: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "results.json"
    results: dict[str, Any] = {}  # this process's results, merged into the file
    stages = stages or ["teacher", "distill", "forgetting", "imbalance", "control"]
    if {"teacher", "distill", "control"} & set(stages) or any("forgetting" in s for s in stages):
        results["teacher"] = _short(teacher()["test"])
    for stage in stages:
        if stage == "distill":
            distill(results)
        elif stage == "control":
            control(results)
        elif stage.startswith("forgetting"):
            lam, _, epochs = stage.partition("=")[2].partition(":")
            forgetting(results, float(lam or 1e3), int(epochs or 1))
        elif stage == "imbalance":
            imbalance(results)
        merged = json.loads(path.read_text()) if path.is_file() else {}
        for key, value in results.items():  # stages may run in parallel processes
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key].update(value)
            else:
                merged[key] = value
        path.write_text(json.dumps(merged, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
