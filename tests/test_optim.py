"""Parameter groups (no decay on biases and norms) and the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tunesmith.config.root import OptimConfig
from tunesmith.methods.base import ParamGroup
from tunesmith.training.optim import build_optimizer, build_scheduler, schedule_factor, warmup_steps


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def test_no_decay_for_biases_and_norm_weights():
    model = _model()
    groups = [ParamGroup("all", list(model.named_parameters()))]
    opt = build_optimizer(groups, OptimConfig(lr=1e-3, weight_decay=0.1))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"all", "all/no_decay"}
    assert by_name["all"]["weight_decay"] == 0.1
    assert by_name["all/no_decay"]["weight_decay"] == 0.0
    decayed = {id(p) for p in by_name["all"]["params"]}
    assert decayed == {id(model[0].weight), id(model[2].weight)}
    assert len(by_name["all/no_decay"]["params"]) == 4  # two biases, norm weight and bias


def test_group_multipliers_scale_the_lr():
    model = _model()
    groups = [
        ParamGroup("low", list(model[0].named_parameters()), lr_multiplier=0.1),
        ParamGroup("high", list(model[2].named_parameters()), lr_multiplier=1.0),
    ]
    opt = build_optimizer(groups, OptimConfig(lr=1e-3))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["low"] == pytest.approx(1e-4) and lrs["high"] == pytest.approx(1e-3)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_follows_formula_through_the_optimizer(kind):
    cfg = OptimConfig(lr=1e-3, scheduler=kind, warmup_ratio=0.1)
    model = _model()
    opt = build_optimizer([ParamGroup("all", list(model.named_parameters()))], cfg)
    total = 50
    sched = build_scheduler(opt, cfg, total)
    warm = warmup_steps(cfg, total)
    assert warm == 5
    for step in range(total):
        expected = 1e-3 * schedule_factor(step, total=total, warmup=warm, kind=kind)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        opt.step()
        sched.step()


def test_schedule_shapes():
    f = lambda s, k: schedule_factor(s, total=100, warmup=10, kind=k)  # noqa: E731
    assert f(0, "cosine") == pytest.approx(0.1)
    assert f(9, "cosine") == pytest.approx(1.0)
    assert f(10, "cosine") == pytest.approx(1.0)
    assert f(55, "cosine") == pytest.approx(0.5)
    assert f(55, "linear") == pytest.approx(0.5)
    assert f(100, "linear") == pytest.approx(0.0)
    assert f(80, "constant") == 1.0
    assert f(40, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 30 / 90)))


def test_fused_adamw_is_used_on_cpu():
    model = _model()
    opt = build_optimizer([ParamGroup("all", list(model.named_parameters()))], OptimConfig())
    assert opt.defaults.get("fused") is True
    loss = model(torch.randn(3, 4)).sum()
    loss.backward()
    opt.step()
