"""Training control on the tiny model: early stopping, divergence guard, precision, heads."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
import torch

from conftest import tiny_config, toy_rows, write_csv
from tunesmith.api import train
from tunesmith.config.root import Config
from tunesmith.errors import ConfigError, TrainingDiverged
from tunesmith.tasks.base import get_task
from tunesmith.training import precision
from tunesmith.training.early_stop import EarlyStopping
from tunesmith.training.monitor import read_metrics


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "toy.csv", toy_rows(96))


def test_early_stopping_rule():
    stop = EarlyStopping(higher_is_better=True, patience=2)
    assert stop.update(0.5, 1) and not stop.should_stop
    assert not stop.update(0.5, 2)  # equal is not better
    assert not stop.update(0.4, 3) and stop.should_stop
    assert (stop.best, stop.best_step) == (0.5, 1)
    lower = EarlyStopping(higher_is_better=False, patience=None)
    assert lower.update(1.0, 1) and lower.update(0.9, 2) and not lower.update(0.95, 3)
    assert not lower.should_stop


def test_run_stops_early_when_the_metric_plateaus(tiny_bert, data, tmp_path):
    cfg = Config.from_dict(
        tiny_config(
            tiny_bert,
            data,
            tmp_path / "run",
            optim={"lr": 1e-12},  # nothing moves: no evaluation improves on the first
            train={"epochs": 20, "eval_steps": 2, "early_stopping_patience": 2},
            eval={"metric": "accuracy"},
        )
    )
    result = train(cfg, progress=False)
    assert result.loop.stopped_early
    assert result.loop.steps == 6  # evaluations at steps 2, 4, 6; patience 2
    val = [
        r for r in read_metrics(result.output_dir / "metrics.jsonl") if r["split"] == "validation"
    ]
    assert [r["step"] for r in val] == [2, 4, 6]
    assert result.loop.best_step == 2


def test_final_weights_are_always_evaluated(tiny_bert, data, tmp_path):
    cfg = Config.from_dict(
        tiny_config(tiny_bert, data, tmp_path / "run", train={"epochs": 1, "eval_steps": 2})
    )
    result = train(cfg, progress=False)  # 86 train rows / 16 = 6 steps: evals at 2, 4, 6
    steps = [
        r["step"]
        for r in read_metrics(result.output_dir / "metrics.jsonl")
        if r["split"] == "validation"
    ]
    assert steps[-1] == result.loop.steps


def test_non_finite_loss_skips_steps_then_stops(tiny_bert, data, tmp_path, monkeypatch):
    from tunesmith.tasks.classification import SequenceClassification

    original = SequenceClassification.loss_sum

    def poisoned(self, outputs, batch):
        return original(self, outputs, batch) * math.inf

    monkeypatch.setattr(SequenceClassification, "loss_sum", poisoned)
    cfg = Config.from_dict(tiny_config(tiny_bert, data, tmp_path / "run"))
    with pytest.raises(TrainingDiverged, match="3 consecutive steps") as info:
        train(cfg, progress=False)
    assert info.value.exit_code == 2
    assert not (tmp_path / "run" / "best").exists()  # nothing non-finite was saved


def test_new_head_is_xavier_uniform(tiny_bert, data, tmp_path):
    from tunesmith.models.loading import load_tokenizer

    cfg = Config.from_dict(tiny_config(tiny_bert, data, tmp_path / "run"))
    model = get_task(cfg).build_model(["a", "b", "c"], load_tokenizer(str(tiny_bert)))
    weight, bias = model.classifier.weight, model.classifier.bias
    bound = math.sqrt(6 / (weight.shape[0] + weight.shape[1]))
    assert weight.abs().max() <= bound
    assert weight.abs().max() > 0.7 * bound  # uniform over the whole range, not N(0, 0.02)
    assert torch.count_nonzero(bias) == 0
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_text_pairs(tiny_bert, tmp_path):
    rows = [
        {"premise": r["text"], "hypothesis": "the film", "label": r["label"]} for r in toy_rows(64)
    ]
    data = write_csv(tmp_path / "pairs.csv", rows)
    cfg = Config.from_dict(
        tiny_config(
            tiny_bert,
            data,
            tmp_path / "run",
            data={"text_column": "premise", "text_pair_column": "hypothesis"},
            train={"epochs": 1},
        )
    )
    task = get_task(cfg)
    from tunesmith.models.loading import load_tokenizer

    feats = task.encode(
        task.load_records(str(data))[:2], load_tokenizer(str(tiny_bert)), {"neg": 0, "pos": 1}
    )
    assert 1 in feats[0]["token_type_ids"]  # the second segment is marked
    assert train(cfg, progress=False).loop.steps > 0


def test_precision_resolution(monkeypatch):
    assert precision.resolve_precision("fp32", cuda=False) == "no"
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    assert precision.resolve_precision("auto", cuda=False) == "no"
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: True)
    assert precision.resolve_precision("auto", cuda=False) == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        precision.resolve_precision("fp16", cuda=False)


def test_bf16_without_native_support_warns_with_the_measured_slowdown(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr(logging.getLogger("tunesmith"), "propagate", True)  # the CLI turns it off
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        assert precision.resolve_precision("bf16", cuda=False) == "bf16"
    assert re.search(r"a bf16 matmul just ran \d+x slower than fp32 here", caplog.text)
    assert precision.bf16_slowdown((64, 64, 64), repeats=1) > 0


def test_bf16_reaches_the_accuracy_of_fp32(tiny_bert, tmp_path):
    """bf16 autocast (slow per FLOP on AVX2, but a tiny model) learns the toy task as fp32 does."""
    data = write_csv(tmp_path / "toy.csv", toy_rows(240))
    accuracy = {}
    for name in ("fp32", "bf16"):
        cfg = tiny_config(tiny_bert, data, tmp_path / name, train={"precision": name, "epochs": 6})
        cfg["data"]["test_fraction"] = 0.25
        result = train(Config.from_dict(cfg), progress=False)
        assert math.isfinite(result.validation_metrics["loss"])
        accuracy[name] = result.test_metrics["accuracy"]
    assert accuracy["fp32"] >= 0.8, accuracy
    assert abs(accuracy["bf16"] - accuracy["fp32"]) <= 0.1, accuracy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_with_grad_scaler_on_gpu(tiny_bert, data, tmp_path):
    cfg = Config.from_dict(
        tiny_config(tiny_bert, data, tmp_path / "run", train={"precision": "fp16", "epochs": 1})
    )
    result = train(cfg, progress=False)
    assert math.isfinite(result.validation_metrics["loss"])
