"""Hidden-state matching, one teacher pass per batch, the latency probe and `tunesmith distill`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import toy_rows, write_csv
from test_objective_e2e import _quick, _train_records, reference_run
from tunesmith.api import TrainResult, load_checkpoint, train
from tunesmith.cli import main
from tunesmith.data.batching import Collator, FeatureDataset
from tunesmith.errors import ConfigError
from tunesmith.evaluation.speed import forward_latency, make_batches, percentile
from tunesmith.objectives.distill.hidden import (
    BlockOutputs,
    HiddenTerm,
    LiveTeacher,
    masked_mse,
    matched_blocks,
)
from tunesmith.objectives.distill.teacher import TeacherLogits

pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["reference_run"]


# -- pieces -------------------------------------------------------------------------
def test_masked_mse_ignores_padding_by_hand():
    a = torch.tensor([[[1.0, 1.0], [5.0, 5.0]], [[0.0, 2.0], [9.0, 9.0]]])
    b = torch.zeros(2, 2, 2)
    mask = torch.tensor([[1, 1], [1, 0]])
    # Real tokens: (1+1)/2, (25+25)/2, (0+4)/2 -> mean (1 + 25 + 2) / 3
    assert float(masked_mse(a, b, mask)) == pytest.approx(28 / 3)
    assert float(masked_mse(a, b, None)) == pytest.approx((1 + 25 + 2 + 81) / 4)


def test_blocks_are_matched_as_copied_or_evenly_spaced():
    assert matched_blocks(2, 6, [1, 4]) == [(0, 1), (1, 4)]
    assert matched_blocks(3, 6, None) == [(0, 0), (1, 2), (2, 5)]
    assert matched_blocks(1, 6, None) == [(0, 5)]  # the last with the last
    with pytest.raises(ConfigError, match="teacher only 2"):
        matched_blocks(3, 2, None)


def _teacher_batch(run: TrainResult):
    _cfg, task, model, tokenizer, labels = load_checkpoint(run.best_dir)
    records = toy_rows(6, seed=9)
    features = task.encode(records, tokenizer, {lab: i for i, lab in enumerate(labels)})
    batch = Collator(tokenizer.pad_token_id)(features)
    return task, model, batch


def test_hidden_term_is_zero_for_an_identical_student_and_trains_only_the_student(
    reference_run: TrainResult,
):
    task, teacher, batch = _teacher_batch(reference_run)
    student = copy.deepcopy(teacher).train()
    live = LiveTeacher(task, teacher, hidden=True)
    pairs = matched_blocks(2, 2, None)
    term = HiddenTerm(BlockOutputs(student), live, pairs, task, weight=3.0)
    out = student(**task.model_inputs(dict(batch)))
    assert term.loss_sum(out, batch).item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        next(student.bert.encoder.layer[0].parameters()).add_(0.5)
    out = student(**task.model_inputs(dict(batch)))
    value = term.loss_sum(out, batch)
    assert value.item() > 0
    value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_live_teacher_runs_once_per_batch_for_kd_and_hidden_terms(reference_run: TrainResult):
    task, teacher, batch = _teacher_batch(reference_run)
    student = copy.deepcopy(teacher)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    live = LiveTeacher(task, teacher, hidden=True)
    term = HiddenTerm(BlockOutputs(student), live, [(0, 0), (1, 1)], task, weight=1.0)
    logits = TeacherLogits(task, live=live)
    out = student(**task.model_inputs(dict(batch)))
    logits.for_batch(batch, out.logits.shape)
    term.loss_sum(out, batch)
    assert len(calls) == 1
    other = {k: v.clone() for k, v in batch.items()}  # a new batch: the teacher runs again
    logits.for_batch(other, out.logits.shape)
    assert len(calls) == 2


def test_percentile_and_latency_probe(reference_run: TrainResult):
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    _cfg, task, model, tokenizer, _labels = load_checkpoint(reference_run.best_dir)
    features = FeatureDataset(task.encode(toy_rows(24, seed=3), tokenizer, None)).features
    batches = make_batches(features, Collator(tokenizer.pad_token_id), 4, limit=5)
    assert len(batches) == 5 and batches[0]["input_ids"].shape[0] == 4
    timed = forward_latency({"a": model, "b": model}, batches, task.model_inputs)
    for lat in timed.values():
        assert 0 < lat.p50_ms <= lat.p95_ms and lat.batches == 5 and lat.batch_size == 4
        assert lat.examples_per_s == pytest.approx(20 / (lat.ms_per_example * 20 / 1000), rel=0.01)


# -- end to end -----------------------------------------------------------------------
def test_distillation_with_hidden_matching_logs_its_part(
    tiny_bert: Path, tmp_path: Path, reference_run: TrainResult
):
    data = write_csv(tmp_path / "sentiment.csv", toy_rows(48, seed=5))
    distill = {
        "teacher": str(reference_run.best_dir),
        "alpha": 0.5,
        "hidden_weight": 2.0,
        "student_layers": [0, 1],  # every block: starts identical to the teacher
    }
    cfg = _quick(tiny_bert, data, tmp_path / "run", distill=distill, train={"log_steps": 1})
    run = train(cfg, progress=False)
    records = _train_records(run)
    assert records[0]["loss/hidden"] == pytest.approx(0.0, abs=1e-9)  # step 1: no change yet
    assert any(r["loss/hidden"] > 0 for r in records[1:])
    for r in records:
        total = 0.5 * r["loss"] + r["loss/kd"] + r["loss/hidden"]
        assert r["loss/total"] == pytest.approx(total, rel=1e-6)
    dumped = cfg.model_dump()
    dumped["distill"]["hidden_weight"] = 0.0
    dumped["train"]["output_dir"] = str(tmp_path / "plain")
    plain = _train_records(train(type(cfg).from_dict(dumped), progress=False))
    assert "loss/hidden" not in plain[0]


def test_cli_distill_prints_and_saves_the_teacher_student_table(
    tiny_bert: Path, tmp_path: Path, reference_run: TrainResult, capsys
):
    data = write_csv(tmp_path / "sentiment.csv", toy_rows(48, seed=5))
    cfg = _quick(
        tiny_bert,
        data,
        tmp_path / "run",
        distill={"teacher": str(reference_run.best_dir), "student_layers": 1},
        data={"test_fraction": 0.25},
    )
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["-q", "distill", str(path), "--no-progress", "--batches", "3"]) == 0
    out = capsys.readouterr().out
    assert "distillation on the test split" in out and "student/teacher" in out
    report = json.loads((tmp_path / "run" / "distill_report.json").read_text())
    t, s = report["models"]["teacher"], report["models"]["student"]
    assert s["parameters"] < t["parameters"]
    assert report["kept"] == pytest.approx(s["metrics"]["accuracy"] / t["metrics"]["accuracy"])
    assert s["latency_bs1"]["batches"] == 3 and t["latency_bs32"]["batch_size"] >= 1
    del cfg  # without a teacher the command refuses before training
    bare = yaml.safe_load(path.read_text())
    bare["distill"] = {}
    bare["train"]["output_dir"] = str(tmp_path / "bare")
    path.write_text(yaml.safe_dump(bare))
    assert main(["-q", "distill", str(path)]) != 0
    assert "distill.teacher is not set" in capsys.readouterr().err
    assert not (tmp_path / "bare").exists()
