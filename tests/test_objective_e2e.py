"""End to end on the tiny BERT: each loss option, penalty and distillation trains and logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import NEGATIVE, POSITIVE, tiny_config, toy_rows, write_csv
from tunesmith.api import TrainResult, evaluate, train
from tunesmith.config.root import Config
from tunesmith.models.folders import read_manifest
from tunesmith.training.monitor import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def _quick(model: Path, data_file: Path, out: Path, **sections: dict) -> Config:
    cfg = tiny_config(model, data_file, out, **sections)
    cfg["train"].update({"epochs": 2, "batch_size": 8, "log_steps": 2, "precision": "fp32"})
    cfg["train"].update(sections.get("train", {}))
    return Config.from_dict(cfg)


def _train_records(run: TrainResult) -> list[dict]:
    return [r for r in read_metrics(run.output_dir / "metrics.jsonl") if r["split"] == "train"]


def _ner_rows(n: int) -> list[dict]:
    """Toy NER: the sentiment word of each toy sentence is the entity (B-POS / B-NEG)."""
    rows = []
    for r in toy_rows(n, seed=4):
        words = r["text"].split()
        tags = ["B-POS" if w in POSITIVE else "B-NEG" if w in NEGATIVE else "O" for w in words]
        rows.append({"tokens": words, "tags": tags})
    return rows


@pytest.fixture(scope="module")
def reference_run(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """A sentiment model: the teacher and the reference checkpoint of the tests below."""
    tmp = tmp_path_factory.mktemp("reference")
    data = write_csv(tmp / "sentiment.csv", toy_rows(64, seed=1))
    return train(_quick(tiny_bert, data, tmp / "run", train={"epochs": 3}), progress=False)


def test_loss_options_regularisers_and_their_logged_parts(tiny_bert: Path, tmp_path: Path):
    rows = [r for i, r in enumerate(toy_rows(80)) if r["label"] == "neg" or i % 8 == 0]
    data = write_csv(tmp_path / "imbalanced.csv", rows)
    cfg = _quick(
        tiny_bert,
        data,
        tmp_path / "run",
        task={"label_smoothing": 0.1},
        loss={"type": "focal", "focal_gamma": 1.0, "class_weights": "inverse"},
        regularize={"l2_sp": 0.01, "hidden_dropout": 0.1, "attention_dropout": 0.1},
    )
    run = train(cfg, progress=False)
    records = _train_records(run)
    assert records and all({"loss", "loss/l2_sp", "loss/total"} <= r.keys() for r in records)
    assert records[0]["loss/l2_sp"] >= 0 and records[-1]["loss/l2_sp"] > 0
    for r in records:  # total = task loss + penalty (no task weight without KD)
        assert r["loss/total"] == pytest.approx(r["loss"] + r["loss/l2_sp"], rel=1e-6)
    weights = read_manifest(run.best_dir)["class_weights"]
    assert weights[1] > 2 * weights[0]  # "pos" is the rare class
    assert json.loads((run.best_dir / "config.json").read_text())["hidden_dropout_prob"] == 0.1
    # The reloaded checkpoint weighs its loss the same way: eval reproduces the logged loss.
    again = evaluate(run.best_dir, split="validation")
    assert again["loss"] == pytest.approx(run.validation_metrics["loss"], abs=1e-6)


def test_token_classification_class_weights_and_focal(tiny_bert: Path, tmp_path: Path):
    path = tmp_path / "ner.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _ner_rows(48)), encoding="utf-8")
    cfg = _quick(
        tiny_bert,
        path,
        tmp_path / "run",
        task={"type": "token_classification"},
        loss={"type": "focal", "class_weights": "effective", "effective_beta": 0.99},
    )
    assert cfg.eval.metric == "entity_f1"
    run = train(cfg, progress=False)
    weights = read_manifest(run.final_dir)["class_weights"]
    assert len(weights) == 3 and weights[0] < min(weights[1:])  # "O" is the common tag
    assert all(r["loss"] > 0 for r in _train_records(run))


def test_ewc_replay_and_forgetting_report(tiny_bert: Path, tmp_path: Path):
    reference = write_csv(tmp_path / "reference.csv", toy_rows(40, seed=2))
    flipped = [
        {**r, "label": "pos" if r["label"] == "neg" else "neg"} for r in toy_rows(48, seed=3)
    ]
    data = write_csv(tmp_path / "new.csv", flipped)
    cfg = _quick(
        tiny_bert,
        data,
        tmp_path / "run",
        data={"validation_fraction": 0.25},
        forgetting={"reference_data": str(reference), "ewc": 5.0, "replay": 0.25},
    )
    run = train(cfg, progress=False)
    assert (run.output_dir / "ewc.safetensors").is_file()
    records = _train_records(run)
    assert all("loss/ewc" in r for r in records) and records[-1]["loss/ewc"] > 0
    # 36 training rows + 12 replayed per epoch (a quarter of 48) in batches of 8.
    assert run.loop.steps == 2 * 6
    summary = json.loads((run.output_dir / "summary.json").read_text())
    report = summary["forgetting"]
    assert report["metric"] == "accuracy" and report["before"] is not None
    assert report["retention"] == pytest.approx(report["after"] / report["before"], rel=1e-5)
    logged = [
        r for r in read_metrics(run.output_dir / "metrics.jsonl") if r["split"] == "reference"
    ]
    assert logged[0]["forgetting/retention"] == report["retention"]


def test_reference_checkpoint_of_another_task(
    tiny_bert: Path, tmp_path: Path, reference_run: TrainResult
):
    path = tmp_path / "ner.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _ner_rows(40)), encoding="utf-8")
    # The new task starts from the reference model: its 2-way head gives way to a 3-tag one.
    cfg = _quick(
        reference_run.best_dir,
        path,
        tmp_path / "run",
        task={"type": "token_classification"},
        forgetting={
            "reference_checkpoint": str(reference_run.best_dir),
            "ewc": 100.0,
            "fisher_samples": 8,
            "reference_samples": 16,
        },
    )
    run = train(cfg, progress=False)
    records = _train_records(run)
    assert records[-1]["loss/ewc"] > 0
    assert len(json.loads((run.final_dir / "config.json").read_text())["id2label"]) == 3
    report = run.forgetting
    # The reference examples are the reference run's own validation split (its splits.json).
    assert report["before"] == pytest.approx(reference_run.validation_metrics["accuracy"])
    assert 0 <= report["after"] <= 1
    with pytest.raises(Exception, match="cannot share its batches"):
        bad = cfg.model_dump()
        bad["forgetting"]["replay"] = 0.2
        bad["train"].update(output_dir=str(tmp_path / "bad"))
        train(Config.from_dict(bad), progress=False)


def test_distillation_into_a_layer_dropped_student(
    tiny_bert: Path, tmp_path: Path, reference_run: TrainResult
):
    data = write_csv(tmp_path / "sentiment.csv", toy_rows(48, seed=5))
    cfg = _quick(
        tiny_bert,
        data,
        tmp_path / "run",
        distill={
            "teacher": str(reference_run.best_dir),
            "alpha": 0.7,
            "temperature": 2.0,
            "student_layers": 1,
        },
    )
    run = train(cfg, progress=False)
    assert (run.output_dir / "teacher_logits.safetensors").is_file()
    assert json.loads((run.final_dir / "config.json").read_text())["num_hidden_layers"] == 1
    for r in _train_records(run):
        assert r["loss/kd"] >= 0
        assert r["loss/total"] == pytest.approx(0.3 * r["loss"] + r["loss/kd"], rel=1e-6)
    assert evaluate(run.final_dir, split="validation")["accuracy"] >= 0.0
    live = cfg.model_dump()
    live["distill"]["cache_logits"] = False
    live["distill"]["student_layers"] = None
    live["train"].update(output_dir=str(tmp_path / "live"), max_steps=2)
    run = train(Config.from_dict(live), progress=False)
    assert not (run.output_dir / "teacher_logits.safetensors").exists()
    assert "loss/kd" in _train_records(run)[-1]


def test_resume_reuses_the_fisher_and_teacher_logits_and_ends_identical(
    tiny_bert: Path, tmp_path: Path, reference_run: TrainResult, monkeypatch
):
    import shutil

    import torch
    from safetensors.torch import load_file

    from tunesmith.objectives.distill import teacher
    from tunesmith.objectives.regularize import fisher

    data = write_csv(tmp_path / "new.csv", toy_rows(40, seed=7))
    reference = write_csv(tmp_path / "reference.csv", toy_rows(24, seed=8))
    sections = {
        "forgetting": {"reference_data": str(reference), "ewc": 2.0, "replay": 0.3},
        "distill": {"teacher": str(reference_run.best_dir), "alpha": 0.5},
        "regularize": {"l2_sp": 0.05},
        "train": {"save_steps": 4, "save_minutes": None, "save_total_limit": 100},
    }
    whole = train(_quick(tiny_bert, data, tmp_path / "whole", **sections), progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(whole.output_dir, copy)

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run must read this from the run folder")

    monkeypatch.setattr(fisher, "estimate_fisher", refuse)
    monkeypatch.setattr(teacher, "compute_logits", refuse)
    cfg = Config.load(copy / "config.yaml")
    resumed = train(cfg, progress=False, resume=copy / "checkpoints" / "step-0000008")
    a = load_file(whole.final_dir / "model.safetensors")
    b = load_file(resumed.final_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).parent.parent / "examples" / "after_sentiment").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_follow_up_examples_validate(path: Path):
    """The examples that start from runs/sentiment/best (not run: they need that run)."""
    cfg = Config.load(path)
    assert cfg.distill.teacher or cfg.forgetting.reference_checkpoint
