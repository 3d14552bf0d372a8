"""Per-layer-group gradient norms, per-group clipping and the non-finite (NaN) guard."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config, toy_rows, write_csv
from helpers import bert_config, bert_features, make_trainer
from tunesmith.api import train
from tunesmith.config.root import Config
from tunesmith.errors import TrainingDiverged
from tunesmith.training.loop import Trainer
from tunesmith.training.monitor import read_metrics
from tunesmith.training.step import clip_to

GROUPS = ["embeddings", "block.0", "block.1", "head"]
#: A weight of block.1 of the tiny BERT classifier.
POISONED = "bert.encoder.layer.1.output.dense.weight"


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "toy.csv", toy_rows(96))


@pytest.fixture(scope="module")
def features(tiny_bert: Path) -> list:
    return bert_features(tiny_bert)


def _train_lines(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]


# -- per-group gradient norms in metrics.jsonl ---------------------------------------------
def test_group_grad_norms_are_logged(tiny_bert, data, tmp_path):
    cfg = Config.from_dict(
        tiny_config(
            tiny_bert,
            data,
            tmp_path / "run",
            optim={"max_grad_norm": 1.0},
            train={"epochs": 1, "log_steps": 2, "precision": "fp32"},
        )
    )
    result = train(cfg, progress=False)
    lines = [r for r in _train_lines(result.output_dir) if "loss" in r]
    assert [r["step"] for r in lines][:2] == [2, 4]
    for r in lines:
        if r["step"] % 2:
            continue  # the last step of the run is logged but not a grad-norm step
        norms = {g: r[f"grad_norm/{g}"] for g in GROUPS}
        assert all(v > 0 and math.isfinite(v) for v in norms.values()), r
        # Pre-clip norms: together they make up the global (pre-clip) norm.
        total = math.sqrt(sum(v * v for v in norms.values()))
        assert total == pytest.approx(r["grad_norm"], rel=1e-4)
        assert not any(k.startswith("grad_norm/") and k[10:] not in GROUPS for k in r)


def test_grad_norm_steps_logs_between_log_lines(tiny_bert, data, tmp_path):
    cfg = Config.from_dict(
        tiny_config(
            tiny_bert,
            data,
            tmp_path / "run",
            train={"max_steps": 4, "log_steps": 4, "grad_norm_steps": 1, "precision": "fp32"},
        )
    )
    result = train(cfg, progress=False)
    lines = _train_lines(result.output_dir)
    with_norms = [r["step"] for r in lines if "grad_norm/block.0" in r]
    assert with_norms == [1, 2, 3, 4]
    assert [r["step"] for r in lines if "loss" in r] == [4]


def test_frozen_groups_have_no_grad_norm(tiny_bert, data, tmp_path):
    cfg = Config.from_dict(
        tiny_config(
            tiny_bert,
            data,
            tmp_path / "run",
            method={"name": "freeze", "train_layers": 1},
            train={"max_steps": 2, "log_steps": 1, "precision": "fp32"},
        )
    )
    result = train(cfg, progress=False)
    for r in _train_lines(result.output_dir):
        assert {k for k in r if k.startswith("grad_norm/")} == {
            "grad_norm/block.1",
            "grad_norm/head",
        }


# -- clipping ------------------------------------------------------------------------------
def _norms_at_step(trainer: Trainer, features: list) -> tuple[dict, dict, float | None, bool]:
    """Group norms before clipping, as the optimizer sees them, and the step's norm and outcome."""
    seen: dict[str, float] = {}
    inner = trainer.optimizer.optimizer
    original = inner.step

    def step(*args, **kwargs):
        seen.update(trainer.group_grad_norms())
        return original(*args, **kwargs)

    inner.step = step
    stats = trainer.train_step([trainer.collator(features[:16])])
    return stats.group_norms, seen, stats.grad_norm, not stats.skipped


def test_per_group_clipping_bounds_every_group(tiny_bert, features, tmp_path):
    cfg = bert_config(tiny_bert, tmp_path, optim={"max_grad_norm": 1e-3, "clip_mode": "per_group"})
    trainer, _ = make_trainer(cfg, features, tmp_path)
    before, after, grad_norm, stepped = _norms_at_step(trainer, features)
    assert stepped
    assert set(before) == set(after) == set(GROUPS)
    assert all(v > 1e-3 for v in before.values())  # every group really needs clipping
    for group, value in after.items():
        assert value <= 1e-3 * (1 + 1e-4), group
        assert value == pytest.approx(1e-3, rel=1e-3), group  # clipped to the bound, not below
    # The returned norm is the pre-clip global norm.
    assert grad_norm == pytest.approx(math.sqrt(sum(v * v for v in before.values())), rel=1e-5)


def test_global_clipping_bounds_the_total_only(tiny_bert, features, tmp_path):
    cfg = bert_config(tiny_bert, tmp_path, optim={"max_grad_norm": 1e-3, "clip_mode": "global"})
    trainer, _ = make_trainer(cfg, features, tmp_path)
    before, after, grad_norm, stepped = _norms_at_step(trainer, features)
    assert stepped
    total_after = math.sqrt(sum(v * v for v in after.values()))
    assert total_after == pytest.approx(1e-3, rel=1e-3)
    assert grad_norm == pytest.approx(math.sqrt(sum(v * v for v in before.values())), rel=1e-5)
    # One scale for all groups: the ratios between groups are kept.
    scale = after["head"] / before["head"]
    for group in GROUPS:
        assert after[group] == pytest.approx(before[group] * scale, rel=1e-4)


def test_per_group_clipping_leaves_small_groups_alone(tiny_bert, features, tmp_path):
    cfg = bert_config(tiny_bert, tmp_path, optim={"max_grad_norm": 1e6, "clip_mode": "per_group"})
    trainer, _ = make_trainer(cfg, features, tmp_path)
    before, after, _, stepped = _norms_at_step(trainer, features)
    assert stepped
    assert after == pytest.approx(before, rel=1e-6)


@pytest.mark.parametrize("max_norm", [0.5, 1.0, 1.5, 2.0, 4.0])
def test_clip_to_equals_torch_clipping_bit_for_bit(max_norm):
    """Skipping the multiply by a coefficient clamped at 1 gives torch's exact gradients."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen) * 0.1 for n in (7, 33, 130)]  # norm ~1.3
    ours, theirs = ([torch.nn.Parameter(torch.zeros_like(g)) for g in grads] for _ in range(2))
    for a, b, g in zip(ours, theirs, grads, strict=True):
        a.grad, b.grad = g.clone(), g.clone()
    norm = float(torch.nn.utils.get_total_norm(grads))
    torch.nn.utils.clip_grads_with_norm_(theirs, max_norm, torch.tensor(norm))
    assert clip_to(ours, max_norm, norm) == (norm + 1e-6 > max_norm)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.grad, b.grad)


def test_clip_to_skips_the_pass_when_nothing_is_clipped(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", lambda *a: calls.append(a))
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.ones(3)
    assert not clip_to([param], 1.0, 0.5)
    assert calls == []
    assert clip_to([param], 1.0, 2.0)
    assert len(calls) == 1


# -- the non-finite guard ------------------------------------------------------------------
def _poison(
    param: torch.nn.Parameter, active, value: float = math.inf
) -> torch.utils.hooks.RemovableHandle:
    """Make ``param``'s gradient all ``value`` while ``active()`` is true."""
    return param.register_hook(lambda g: torch.full_like(g, value) if active() else g)


@pytest.mark.parametrize(
    ("value", "max_grad_norm", "clip_mode"),
    [
        pytest.param(math.inf, 1.0, "global", id="inf-global"),
        pytest.param(math.inf, 1.0, "per_group", id="inf-per-group"),
        pytest.param(math.inf, None, "global", id="inf-no-clip"),
        pytest.param(math.nan, 1.0, "global", id="nan-global"),
        pytest.param(math.nan, 1.0, "per_group", id="nan-per-group"),
        pytest.param(math.nan, None, "global", id="nan-no-clip"),
    ],
)
def test_non_finite_gradient_skips_the_step_and_names_the_group(
    tiny_bert, features, tmp_path, caplog, value, max_grad_norm, clip_mode
):
    cfg = bert_config(
        tiny_bert, tmp_path, optim={"max_grad_norm": max_grad_norm, "clip_mode": clip_mode}
    )
    trainer, _ = make_trainer(cfg, features, tmp_path)
    params = dict(trainer.model.named_parameters())
    _poison(params[POISONED], lambda: True, value)
    weights = {n: p.detach().clone() for n, p in params.items()}
    lr_before = [g["lr"] for g in trainer.optimizer.param_groups]
    epoch_before = trainer.scheduler.last_epoch

    with caplog.at_level(logging.WARNING, logger="tunesmith.training.loop"):
        stats = trainer.train_step([trainer.collator(features[:16])])
    assert stats.skipped
    assert "block.1" in stats.bad_where
    assert not any(g in stats.bad_where for g in ("block.0", "embeddings", "head"))
    assert "block.1" in caplog.text and "step skipped" in caplog.text
    for name, p in params.items():
        assert torch.equal(p, weights[name]), f"{name} moved in a skipped step"
        assert p.grad is None
    assert not trainer.optimizer.optimizer.state  # no Adam moments from the bad step
    assert trainer.scheduler.last_epoch == epoch_before
    assert [g["lr"] for g in trainer.optimizer.param_groups] == lr_before


def _poison_training(monkeypatch, bad: Callable[[int], bool]) -> list[int]:
    """Poison block.1's gradient in the training steps ``bad`` picks.

    Counts ``train_step`` calls from 0 (skipped steps included); returns the
    list of calls that were poisoned, filled during the run.
    """
    poisoned: list[int] = []
    calls = {"n": -1}
    original = Trainer.train_step

    def train_step(self, window):
        calls["n"] += 1
        handle = None
        if bad(calls["n"]):
            poisoned.append(calls["n"])
            handle = _poison(dict(self.model.named_parameters())[POISONED], lambda: True)
        try:
            return original(self, window)
        finally:
            if handle is not None:
                handle.remove()

    monkeypatch.setattr(Trainer, "train_step", train_step)
    return poisoned


def _all_saved_tensors_finite(out: Path) -> int:
    files = sorted(out.rglob("*.safetensors"))
    for f in files:
        for key, value in load_file(f).items():
            assert torch.isfinite(value).all(), f"{f}: {key} is not finite"
    return len(files)


def test_consecutive_bad_steps_stop_the_run(tiny_bert, data, tmp_path, monkeypatch, caplog):
    # 86 train rows / 16 = 6 steps per epoch; the first epoch is clean and saves best/.
    poisoned = _poison_training(monkeypatch, lambda n: n >= 6)
    cfg = Config.from_dict(
        tiny_config(tiny_bert, data, tmp_path / "run", train={"epochs": 3, "precision": "fp32"})
    )
    with (
        caplog.at_level(logging.WARNING, logger="tunesmith.training.loop"),
        pytest.raises(TrainingDiverged) as info,
    ):
        train(cfg, progress=False)
    assert info.value.exit_code == 2
    message = str(info.value)
    assert "3 consecutive steps" in message
    assert "block.1" in message
    assert poisoned == [6, 7, 8]
    warnings = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert len(warnings) == 3 and all("block.1" in w for w in warnings)
    out = tmp_path / "run"
    assert (out / "best" / "model.safetensors").is_file()
    assert not (out / "final").exists()
    assert _all_saved_tensors_finite(out) >= 1


def test_max_bad_steps_is_configurable(tiny_bert, data, tmp_path, monkeypatch):
    poisoned = _poison_training(monkeypatch, lambda n: n >= 1)
    cfg = Config.from_dict(
        tiny_config(
            tiny_bert,
            data,
            tmp_path / "run",
            train={"epochs": 1, "max_bad_steps": 2, "precision": "fp32"},
        )
    )
    with pytest.raises(TrainingDiverged, match="2 consecutive steps") as info:
        train(cfg, progress=False)
    assert info.value.exit_code == 2
    assert poisoned == [1, 2]
    assert _all_saved_tensors_finite(tmp_path / "run") == 0  # nothing saved before


def test_isolated_bad_steps_are_skipped_and_training_goes_on(
    tiny_bert, data, tmp_path, monkeypatch
):
    # Twice two bad steps in a row (below the limit of 3) with a good one between.
    poisoned = _poison_training(monkeypatch, lambda n: n in (2, 3, 5, 6))
    cfg = Config.from_dict(
        tiny_config(tiny_bert, data, tmp_path / "run", train={"epochs": 2, "precision": "fp32"})
    )
    result = train(cfg, progress=False)
    assert poisoned == [2, 3, 5, 6]
    assert result.loop.steps == 12  # skipped windows do not count as steps
    assert _all_saved_tensors_finite(result.output_dir) >= 2  # best/ and final/
    final = load_file(result.final_dir / "model.safetensors")
    base = load_file(tiny_bert / "model.safetensors")
    assert not torch.equal(final[POISONED], base[POISONED.removeprefix("bert.")])


def test_weights_overflowing_in_an_update_are_never_saved(tiny_bert, data, tmp_path):
    cfg = Config.from_dict(
        tiny_config(
            tiny_bert,
            data,
            tmp_path / "run",
            optim={"lr": 1e39, "max_grad_norm": None},
            train={"epochs": 1, "eval_steps": 1, "precision": "fp32"},
        )
    )
    with pytest.raises(TrainingDiverged):
        train(cfg, progress=False)
    _all_saved_tensors_finite(tmp_path / "run")
