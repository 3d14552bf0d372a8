"""End to end on a tiny random BERT: train, outputs, reload, eval, predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_config, toy_rows, write_csv
from tunesmith.api import TrainResult, evaluate, predict, train
from tunesmith.config.root import Config
from tunesmith.training.monitor import read_metrics


@pytest.fixture(scope="module")
def run(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    tmp = tmp_path_factory.mktemp("e2e")
    data = write_csv(tmp / "toy.csv", toy_rows(240))
    cfg = Config.from_dict(
        tiny_config(
            tiny_bert, data, tmp / "run", data={"test_fraction": 0.1}, train={"eval_steps": 12}
        )
    )
    return train(cfg, progress=False)


def test_learns_the_toy_task(run: TrainResult):
    assert run.validation_metrics["accuracy"] >= 0.9
    assert run.test_metrics["accuracy"] >= 0.9
    assert run.loop.steps == 8 * 12  # 192 train rows / 16 per batch, 8 epochs


def test_run_folder_layout(run: TrainResult):
    out = run.output_dir
    for name in ("config.yaml", "splits.json", "metrics.jsonl", "parameters.json"):
        assert (out / name).is_file(), name
    for folder in (out / "best", out / "final"):
        assert (folder / "model.safetensors").is_file()
        assert (folder / "config.json").is_file()
        assert (folder / "tunesmith.json").is_file()
        assert not list(folder.glob("*.bin"))
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.old"))
    splits = json.loads((out / "splits.json").read_text())
    rows = splits["rows"]
    assert (len(rows["train"]), len(rows["validation"]), len(rows["test"])) == (192, 24, 24)
    assert not set(rows["train"]) & set(rows["validation"]) | set(rows["train"]) & set(rows["test"])
    # The saved config is the resolved one and loads again.
    assert Config.load(out / "config.yaml").train.eval_steps == 12


def test_metrics_jsonl_lines(run: TrainResult):
    records = read_metrics(run.output_dir / "metrics.jsonl")
    train_lines = [r for r in records if r["split"] == "train"]
    val_lines = [r for r in records if r["split"] == "validation"]
    test_lines = [r for r in records if r["split"] == "test"]
    assert len(val_lines) == 8 and len(test_lines) == 1
    for r in train_lines:
        assert {"step", "epoch", "loss", "tokens_per_s", "rss_mb", "grad_norm"} <= r.keys()
        assert any(k.startswith("lr/") for k in r)
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    best = max(val_lines, key=lambda r: r["accuracy"])
    assert run.validation_metrics["accuracy"] == best["accuracy"]


def test_eval_reproduces_logged_validation_metric(run: TrainResult):
    metrics = evaluate(run.best_dir, split="validation")
    assert metrics["accuracy"] == run.validation_metrics["accuracy"]
    assert metrics["loss"] == pytest.approx(run.validation_metrics["loss"], abs=1e-6)
    test = evaluate(run.best_dir, split="test")
    assert test["accuracy"] == run.test_metrics["accuracy"]


def test_plain_transformers_load_predicts_like_tunesmith(run: TrainResult):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["the film was superb and fun", "a dull boring story", "it was really poor", "lovely"]
    ours = predict(run.best_dir, texts)
    model = AutoModelForSequenceClassification.from_pretrained(run.best_dir).eval()
    tok = AutoTokenizer.from_pretrained(run.best_dir)
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, return_tensors="pt")).logits
    plain = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
    assert [r["label"] for r in ours] == plain == ["pos", "neg", "neg", "pos"]
    probs = logits.softmax(-1)
    for row, p in zip(ours, probs.tolist(), strict=True):
        assert row["probabilities"]["pos"] == pytest.approx(p[1], abs=1e-5)


def test_head_saved_and_reloaded_identically(run: TrainResult, tiny_bert: Path):
    from safetensors.torch import load_file

    best = load_file(run.best_dir / "model.safetensors")
    base = load_file(tiny_bert / "model.safetensors")
    assert "classifier.weight" in best and "classifier.weight" not in base
    # Full fine-tuning changed the encoder too.
    key = next(k for k in base if k.endswith("encoder.layer.0.attention.self.query.weight"))
    assert not torch.equal(best["bert." + key.removeprefix("bert.")], base[key])


def test_output_dir_is_never_replaced_silently(run: TrainResult):
    from tunesmith.errors import ConfigError

    cfg = Config.load(run.output_dir / "config.yaml")
    with pytest.raises(ConfigError, match="already exists"):
        train(cfg, progress=False)
    assert (run.best_dir / "model.safetensors").is_file()


def test_same_seed_same_weights(tiny_bert: Path, tmp_path: Path):
    from safetensors.torch import load_file

    data = write_csv(tmp_path / "toy.csv", toy_rows(64))
    weights = []
    for name in ("a", "b"):
        cfg = Config.from_dict(
            tiny_config(tiny_bert, data, tmp_path / name, train={"epochs": 1, "batch_size": 8})
        )
        weights.append(load_file(train(cfg, progress=False).final_dir / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_trained_model_is_freed_before_the_test_evaluation(tiny_bert, tmp_path, monkeypatch):
    """The reload for the test split must not sit on top of the trained model and its
    optimizer state (it would raise the run's peak memory)."""
    import gc

    import tunesmith.runs.train as api

    alive: list[int] = []
    real_evaluate = api.evaluate

    def counting(*args, **kwargs):
        gc.collect()
        alive.append(
            sum(isinstance(o, torch.nn.Module) and hasattr(o, "bert") for o in gc.get_objects())
        )
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(api, "evaluate", counting)
    data = write_csv(tmp_path / "d.csv", toy_rows(80))
    cfg = tiny_config(tiny_bert, data, tmp_path / "run", train={"epochs": 1})
    cfg["data"]["test_fraction"] = 0.2
    result = train(Config.from_dict(cfg), progress=False)
    assert result.test_metrics and alive == [0]
