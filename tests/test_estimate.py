"""``tunesmith estimate``: exact counts, tensor sizes that match, a total near the real peak."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_config, toy_rows, write_csv
from helpers import LABELS, bert_features, make_trainer
from tunesmith.cli import main
from tunesmith.config.root import Config
from tunesmith.inspect.estimate import estimate, format_estimate
from tunesmith.methods.base import get_method
from tunesmith.models.loading import load_tokenizer
from tunesmith.tasks.base import get_task


def _cfg(tiny_bert: Path, tmp_path: Path, method: dict) -> Config:
    data = write_csv(tmp_path / "d.csv", toy_rows(60))
    return Config.from_dict(
        tiny_config(
            tiny_bert,
            data,
            tmp_path / "run",
            method=method,
            train={"batch_size": 8, "precision": "fp32", "epochs": 1},
        )
    )


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "r": 2}])
def test_counts_and_tensor_sizes_match_the_real_run(tiny_bert: Path, tmp_path: Path, method):
    cfg = _cfg(tiny_bert, tmp_path, method)
    est = estimate(cfg, timed_steps=2)

    # Parameter counts: the model as train builds it, counted independently.
    torch.manual_seed(0)
    model = get_method(cfg).apply(get_task(cfg).build_model(LABELS, load_tokenizer(str(tiny_bert))))
    assert est.total_parameters == sum(p.numel() for p in model.parameters())
    trained = [p for p in model.parameters() if p.requires_grad]
    assert est.trainable_parameters == sum(p.numel() for p in trained)
    assert 0 < est.trainable_parameters <= est.total_parameters
    params_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert est.memory["weights"] == params_bytes + buffers

    # Gradients and optimizer state: the tensors a real step creates.
    trainer, _ = make_trainer(cfg, bert_features(tiny_bert, n=16), tmp_path)
    grads: list[torch.Tensor] = []
    inner = trainer.optimizer.optimizer
    original = inner.step

    def step(*args, **kwargs):  # the gradients as the optimizer receives them
        grads.extend(p.grad for p in trainer.model.parameters() if p.grad is not None)
        return original(*args, **kwargs)

    inner.step = step
    trainer.train_step(next(iter(trainer._epoch_windows())))
    assert est.memory["gradients"] == sum(g.numel() * g.element_size() for g in grads)
    state = [t for s in trainer.optimizer.state.values() for t in s.values()]
    assert all(isinstance(t, torch.Tensor) for t in state)
    assert est.memory["optimizer"] == sum(t.numel() * t.element_size() for t in state)

    assert est.memory["activations"] > 0 and est.memory["runtime"] > 50 * 2**20
    assert est.fits and est.total == sum(est.memory.values())
    assert est.steps_per_epoch == 7 and est.seconds_per_epoch > 0  # 54 train rows / 8
    text = format_estimate(est)
    assert f"{est.total_parameters:,} total" in text and "fits" in text


def test_activations_shrink_with_the_levers(tiny_bert: Path, tmp_path: Path):
    """Measured, not modelled: the feature cache saves nothing for the frozen blocks."""
    frozen = {"name": "freeze", "train_layers": 1}
    cfg = _cfg(tiny_bert, tmp_path, frozen)
    with_cache = estimate(cfg, timed_steps=1)
    without = estimate(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"feature_cache": "off"})}),
        timed_steps=1,
    )
    assert with_cache.cached_blocks == 1 and without.cached_blocks == 0
    # The cache holds each training token's 32 hidden values in fp32.
    tokens = with_cache.memory["feature_cache"] // (32 * 4)
    assert with_cache.memory["feature_cache"] == tokens * 32 * 4 and tokens > 54 * 3
    assert without.memory["feature_cache"] == 0
    # Frozen blocks below the trained ones save no activations either way; the cache
    # also drops the embedding output's saved tensors.
    assert with_cache.memory["activations"] <= without.memory["activations"]
    full = estimate(_cfg(tiny_bert, tmp_path, {"name": "full"}), timed_steps=1)
    assert full.memory["activations"] > without.memory["activations"]


def test_cli_prints_json_and_exits_1_when_it_does_not_fit(tiny_bert: Path, tmp_path: Path, capsys):
    cfg = _cfg(tiny_bert, tmp_path, {"name": "full"})
    path = tmp_path / "c.yaml"
    cfg.save(path)
    assert main(["estimate", str(path), "--json", "--steps", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["total"] == sum(data["memory"].values())
    assert not (tmp_path / "run").exists()  # an estimate writes nothing


# The estimate against the real peak on MiniLM is part of tests/test_slow_demo.py: the
# same real training run (in a fresh process) serves both.
