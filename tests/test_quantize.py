"""Int8 export: agreement with fp32, the safetensors format, reloading, refusals.

A tiny BERT is trained until it separates the toy sentiment data (so agreement
between fp32 and int8 predictions is not trivially that of a constant
classifier), then quantized in memory and exported; the exported folder must
reload through the normal checkpoint path to exactly the in-memory int8 model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import toy_rows
from helpers import PEFT_TEST_MARKS, train_tiny_methods
from tunesmith.api import evaluate, load_checkpoint, predict
from tunesmith.data.batching import Collator
from tunesmith.deploy.compare import compare_checkpoints, format_comparison
from tunesmith.deploy.int8_export import export_int8
from tunesmith.errors import ConfigError, ModelError
from tunesmith.evaluation.evaluator import EvalOptions, checkpoint_size
from tunesmith.models.folders import read_manifest
from tunesmith.models.int8_modules import Int8DynamicLinear, Int8Embedding, quantize_rows
from tunesmith.models.quantize import SPEC, WEIGHTS, int8_plan, load_quantized, quantize_int8

pytestmark = PEFT_TEST_MARKS

#: What an exported folder may hold: safetensors weights, JSON, the WordPiece vocabulary.
ALLOWED_SUFFIXES = {".safetensors", ".json", ".txt"}


@pytest.fixture(scope="module")
def runs(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``best/`` of a trained full run, a one-epoch LoRA run and a one-step bottleneck run."""
    tmp = tmp_path_factory.mktemp("quantize-runs")
    lengths = {"full": {"epochs": 6}, "lora": {"epochs": 1}, "bottleneck": {"max_steps": 1}}
    return train_tiny_methods(tiny_bert, tmp, 160, lengths)


@pytest.fixture(scope="module")
def exported(runs: dict[str, Path]) -> Path:
    """The int8 export of the full run, inside its run folder (so its splits are found)."""
    return export_int8(runs["full"], runs["full"].parent / "int8")


def held_out_logits(model: nn.Module, checkpoint: Path, n: int = 300) -> torch.Tensor:
    """Logits of ``n`` fresh toy sentences (another seed than the training data)."""
    _cfg, task, _model, tokenizer, _labels = load_checkpoint(checkpoint)
    features = task.encode(toy_rows(n, seed=11), tokenizer, None)
    batch = Collator(tokenizer.pad_token_id, tokenizer.padding_side)(features)
    with torch.no_grad():
        return model.eval()(**task.model_inputs(batch)).logits


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


# -- the modules -------------------------------------------------------------------------
def test_rows_round_trip_within_half_a_step():
    weight = torch.randn(6, 10) * torch.logspace(-3, 1, 6)[:, None]
    weight[2] = 0
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and scale.shape == (6,) and int(q.abs().max()) <= 127
    assert torch.all((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7)
    assert scale[2] == 1 and not q[2].any()


def test_int8_modules_approximate_float_ones_and_reload():
    torch.manual_seed(0)
    linear, embedding = nn.Linear(24, 12), nn.Embedding(30, 8, padding_idx=0)
    x, ids = torch.randn(3, 5, 24), torch.tensor([[0, 4, 29]])
    q_linear = Int8DynamicLinear.from_linear(linear)
    q_embedding = Int8Embedding.from_embedding(embedding)
    with torch.no_grad():
        assert torch.allclose(q_linear(x), linear(x), atol=0.05)
        assert torch.allclose(q_embedding(ids), embedding(ids), atol=0.02)
        fresh = Int8DynamicLinear(24, 12)
        fresh.load_state_dict(q_linear.state_dict())  # repacks the kernel's weight
        assert torch.equal(fresh(x), q_linear(x))
    assert set(q_linear.state_dict()) == {"weight_int8", "weight_scale", "bias"}


# -- agreement, size, format, reload ---------------------------------------------------
def test_int8_predictions_agree_with_fp32(runs):
    fp32 = load_checkpoint(runs["full"])[2]
    int8 = quantize_int8(load_checkpoint(runs["full"])[2])
    plan = int8_plan(fp32)
    assert "classifier" not in plan and plan["bert.embeddings.word_embeddings"] == "embedding"
    before, after = held_out_logits(fp32, runs["full"]), held_out_logits(int8, runs["full"])
    names = load_checkpoint(runs["full"])[4]
    truth = torch.tensor([names.index(r["label"]) for r in toy_rows(300, seed=11)])
    assert float((before.argmax(-1) == truth).float().mean()) > 0.8  # it learned the task
    assert agreement(before, after) >= 0.97


def test_export_is_smaller_safetensors_only_and_reloads_exactly(runs, exported):
    assert checkpoint_size(exported)["weights_mb"] < checkpoint_size(runs["full"])["weights_mb"]
    assert {f.suffix for f in exported.iterdir()} <= ALLOWED_SUFFIXES
    tensors = load_file(exported / WEIGHTS)
    assert tensors["bert.encoder.layer.0.intermediate.dense.weight_int8"].dtype == torch.int8
    assert tensors["bert.embeddings.word_embeddings.weight_int8"].dtype == torch.int8
    assert tensors["classifier.weight"].dtype == torch.float32
    spec = json.loads((exported / SPEC).read_text())
    assert spec["modules"]["bert.embeddings.word_embeddings"] == "embedding"
    assert read_manifest(exported)["quantized"] == "int8"

    in_memory = quantize_int8(load_checkpoint(runs["full"])[2])
    reloaded = load_checkpoint(exported)[2]
    assert isinstance(reloaded.bert.encoder.layer[0].output.dense, Int8DynamicLinear)
    assert torch.equal(
        held_out_logits(reloaded, runs["full"]), held_out_logits(in_memory, runs["full"])
    )


def test_eval_and_predict_work_on_the_export(runs, exported):
    metrics = evaluate(exported, split="validation")
    assert metrics["accuracy"] >= evaluate(runs["full"], split="validation")["accuracy"] - 0.1
    rows = predict(exported, ["the film was superb and fun", "a dull boring story"])
    assert [r["label"] for r in rows] == ["pos", "neg"]


def test_comparison_reports_size_speed_and_quality(runs, exported):
    options = EvalOptions(batch_size=8, latency_batches=2, warmup=1)
    result = compare_checkpoints(runs["full"], exported, split="validation", options=options)
    assert result.size_ratio > 1 and result.examples == 16
    assert result.after.latency_bs1_ms > 0 and result.after.throughput > 0
    table = format_comparison(result)
    assert "x smaller" in table and "accuracy" in table and "batch 8" in table
    assert json.dumps(result.as_dict())


def test_lora_is_merged_then_quantized(runs, tmp_path):
    out = export_int8(runs["lora"], tmp_path / "int8")
    manifest = read_manifest(out)
    assert (manifest["method"], manifest["adapter"], manifest["merged_from"]) == (
        "full",
        False,
        "lora",
    )
    fp32, int8 = load_checkpoint(runs["lora"])[2], load_checkpoint(out)[2]
    fp32_logits = held_out_logits(fp32, runs["lora"])
    assert agreement(fp32_logits, held_out_logits(int8, runs["lora"])) >= 0.97


# -- refusals ----------------------------------------------------------------------------
def test_refuses_unmergeable_adapter_existing_output_and_int8_input(runs, exported, tmp_path):
    with pytest.raises(ConfigError, match="int8: method 'bottleneck' cannot be merged"):
        export_int8(runs["bottleneck"], tmp_path / "b")
    with pytest.raises(ConfigError, match="already exists"):
        export_int8(runs["full"], exported)
    with pytest.raises(ConfigError, match="already int8"):
        export_int8(exported, tmp_path / "again")
    assert not (tmp_path / "b").exists() and not (tmp_path / "again").exists()


def edit_spec(folder: Path, change: dict[str, Any]) -> None:
    spec = json.loads((folder / SPEC).read_text())
    (folder / SPEC).write_text(json.dumps({**spec, **change}))


def test_load_refuses_manifests_that_do_not_fit(exported, tmp_path):
    from transformers import AutoModelForSequenceClassification as Auto

    copy = Path(shutil.copytree(exported, tmp_path / "copy"))
    edit_spec(copy, {"version": 99})
    with pytest.raises(ModelError, match="format version 99"):
        load_quantized(copy, Auto)
    edit_spec(copy, {"version": 1, "modules": {"bert.pooler.dense": "linear"}})
    with pytest.raises(ModelError, match="do not fit"):
        load_quantized(copy, Auto)
    edit_spec(copy, {"modules": {"bert.embeddings.LayerNorm": "linear"}})
    with pytest.raises(ModelError, match=r"is not an nn\.Linear"):
        load_quantized(copy, Auto)


# -- the command -------------------------------------------------------------------------
def test_export_command_prints_and_writes_the_comparison(runs, tmp_path, capsys):
    from tunesmith.cli import main

    out = runs["full"].parent / "int8-cli"
    args = ["export", str(runs["full"]), str(out), "--quantize", "int8", "--batch-size", "8"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    # The run has no test split: the comparison falls back to its validation rows.
    assert f"exported int8 model to {out}" in printed and "validation split (16 examples" in printed
    assert "x smaller" in printed and "accuracy" in printed and "throughput batch 8" in printed
    report = json.loads((out / "export_report.json").read_text())
    assert report["kind"] == "int8" and report["size_ratio"] > 1
    assert report["before"]["weights_mb"] > report["after"]["weights_mb"]
    # A data file measures on it; a folder outside a run without one measures nothing.
    loose = Path(shutil.copytree(runs["full"], tmp_path / "loose"))
    assert main(["export", str(loose), str(tmp_path / "q"), "--quantize", "int8"]) == 0
    assert "nothing measured: no held-out split" in capsys.readouterr().out
    assert not (tmp_path / "q" / "export_report.json").exists()
    data = runs["full"].parents[1] / "train.csv"
    args = ["export", str(loose), str(tmp_path / "d"), "--quantize", "int8", "--data", str(data)]
    assert main(args) == 0
    assert f"on {data} (160 examples" in capsys.readouterr().out
    assert main(["export", str(loose), str(tmp_path / "x"), "--quantize", "int4"]) != 0
    assert "unknown --quantize 'int4'; use int8" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
