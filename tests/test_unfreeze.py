"""Progressive unfreezing on the tiny BERT: who trains at each step, and at which LR.

The Trainer is built the way ``tunesmith.runs.train.train`` builds it (method groups,
layer groups, hooks, LR factors); the optimizer's ``step`` is wrapped to record,
just before every update, the learning rate of each optimizer group, which
parameters received a gradient and a copy of every weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import Recorder, bert_config, bert_features, make_trainer
from tunesmith.config.root import Config
from tunesmith.errors import ConfigError
from tunesmith.methods.base import Method
from tunesmith.models.layers import EMBEDDINGS, HEAD
from tunesmith.training.loop import Trainer


def _params_by_group(method: Method, model: torch.nn.Module) -> dict[str, set[str]]:
    layers = method.layers
    assert layers is not None
    return {g: {n for n, _ in layers.params_of(model, g)} for g in layers.groups}


def _names(groups: dict[str, set[str]], *names: str) -> set[str]:
    return set().union(*(groups[g] for g in names))


@pytest.fixture(scope="module")
def features(tiny_bert: Path) -> list[dict[str, Any]]:
    return bert_features(tiny_bert)


def _run(cfg: Config, features, tmp: Path, **kwargs) -> tuple[Trainer, Method, Recorder]:
    recorder = Recorder()
    trainer, method = make_trainer(cfg, features, tmp, hooks=[recorder], **kwargs)
    recorder.attach(trainer)
    trainer.run()
    return trainer, method, recorder


def test_every_steps_releases_one_group_at_a_time(tiny_bert, features, tmp_path):
    cfg = bert_config(
        tiny_bert,
        tmp_path,
        method={"name": "full", "unfreeze": {"every_steps": 2}},
        train={"max_steps": 8},
    )
    trainer, method, rec = _run(cfg, features, tmp_path)
    groups = _params_by_group(method, trainer.model)
    assert list(groups) == [EMBEDDINGS, "block.0", "block.1", HEAD]
    release = {HEAD: 0, "block.1": 2, "block.0": 4, EMBEDDINGS: 6}
    assert {g: method.unfreezing.release_step(g) for g in groups} == release
    # Every group is in the optimizer from the start.
    assert {g["group"] for g in trainer.optimizer.param_groups} == set(groups)

    assert [u.step for u in rec.updates] == list(range(8))
    for u in rec.updates:
        released = [g for g, start in release.items() if u.step >= start]
        expected = _names(groups, *released)
        assert rec.trainable_at_start[u.step] == expected, u.step
        assert u.with_grad == expected, u.step  # frozen groups get no gradient

    final = dict(trainer.model.named_parameters())
    for group, start in release.items():
        for u in rec.updates:
            for name in groups[group]:
                if u.step <= start:  # weights before the group's first update
                    assert torch.equal(u.weights[name], rec.updates[0].weights[name]), (
                        name,
                        u.step,
                    )
        moved = [n for n in groups[group] if not torch.equal(final[n], rec.updates[0].weights[n])]
        assert moved, f"{group} never changed after its release"
        # ... and it changed right after its first update.
        if start + 1 < len(rec.updates):
            after = rec.updates[start + 1].weights
            assert any(not torch.equal(after[n], rec.updates[0].weights[n]) for n in groups[group])


def test_lr_is_zero_until_release(tiny_bert, features, tmp_path):
    cfg = bert_config(
        tiny_bert,
        tmp_path,
        method={"name": "full", "unfreeze": {"every_steps": 2}},
        train={"max_steps": 8},
    )
    _, _, rec = _run(cfg, features, tmp_path)
    release = {HEAD: 0, "block.1": 2, "block.0": 4, EMBEDDINGS: 6}
    for u in rec.updates:
        for name, lr in u.lr.items():
            group = name.removesuffix("/no_decay")
            expected = 1e-2 if u.step >= release[group] else 0.0
            assert lr == pytest.approx(expected, rel=1e-12, abs=0), (name, u.step)


def test_warmup_of_a_released_group_is_linear(tiny_bert, features, tmp_path):
    cfg = bert_config(
        tiny_bert,
        tmp_path,
        method={"name": "full", "unfreeze": {"every_steps": 2, "warmup_steps": 3}},
        train={"max_steps": 8},
    )
    _, method, rec = _run(cfg, features, tmp_path)
    release = {HEAD: 0, "block.1": 2, "block.0": 4, EMBEDDINGS: 6}
    for u in rec.updates:
        for name, lr in u.lr.items():
            start = release[name.removesuffix("/no_decay")]
            factor = 0.0 if u.step < start else min(1.0, (u.step - start + 1) / 3)
            assert lr == pytest.approx(1e-2 * factor, rel=1e-12, abs=0), (name, u.step)
    # Spelled out for block.1 (released at step 2): 0, 0, 1/3, 2/3, 1, 1, ...
    ramp = [method.lr_factor("block.1")(s) for s in range(7)]
    assert ramp == pytest.approx([0, 0, 1 / 3, 2 / 3, 1, 1, 1], rel=1e-12)


def test_unfreezing_factor_multiplies_the_schedule(tiny_bert, features, tmp_path):
    from tunesmith.training.optim import schedule_factor

    cfg = bert_config(
        tiny_bert,
        tmp_path,
        method={"name": "full", "llrd": 0.5, "unfreeze": {"every_steps": 2, "warmup_steps": 2}},
        optim={"scheduler": "cosine", "warmup_steps": 3},
        train={"max_steps": 8},
    )
    _, _, rec = _run(cfg, features, tmp_path)
    release = {HEAD: 0, "block.1": 2, "block.0": 4, EMBEDDINGS: 6}
    mult = {HEAD: 1.0, "block.1": 0.5, "block.0": 0.25, EMBEDDINGS: 0.125}
    for u in rec.updates:
        sched = schedule_factor(u.step, total=8, warmup=3, kind="cosine")
        for name, lr in u.lr.items():
            group = name.removesuffix("/no_decay")
            start = release[group]
            extra = 0.0 if u.step < start else min(1.0, (u.step - start + 1) / 2)
            assert lr == pytest.approx(1e-2 * mult[group] * sched * extra, rel=1e-12, abs=0)


def test_max_layers_stops_the_schedule(tiny_bert, features, tmp_path):
    cfg = bert_config(
        tiny_bert,
        tmp_path,
        method={"name": "full", "unfreeze": {"every_steps": 2, "max_layers": 1}},
        train={"max_steps": 8},
    )
    trainer, method, rec = _run(cfg, features, tmp_path)
    groups = _params_by_group(method, trainer.model)
    assert method.unfreezing.release_step("block.0") is None
    assert method.unfreezing.release_step(EMBEDDINGS) is None
    for u in rec.updates:
        expected = _names(groups, HEAD, *(["block.1"] if u.step >= 2 else []))
        assert u.with_grad == expected, u.step
        for name, lr in u.lr.items():
            if name.removesuffix("/no_decay") in ("block.0", EMBEDDINGS):
                assert lr == 0.0
    final = dict(trainer.model.named_parameters())
    for name in _names(groups, "block.0", EMBEDDINGS):
        assert torch.equal(final[name], rec.updates[0].weights[name]), name
    for name in _names(groups, "block.1", HEAD):
        assert not torch.equal(final[name], rec.updates[0].weights[name]), name


def test_start_layers_trains_top_blocks_from_the_start(tiny_bert, features, tmp_path):
    cfg = bert_config(
        tiny_bert,
        tmp_path,
        method={"name": "full", "unfreeze": {"every_steps": 3, "start_layers": 1}},
        train={"max_steps": 7},
    )
    trainer, method, rec = _run(cfg, features, tmp_path)
    groups = _params_by_group(method, trainer.model)
    stages = {0: [HEAD, "block.1"], 3: ["block.0"], 6: [EMBEDDINGS]}
    for u in rec.updates:
        released = [g for start, gs in stages.items() if u.step >= start for g in gs]
        assert u.with_grad == _names(groups, *released), u.step


def test_freeze_method_unfreezes_only_selected_blocks(tiny_bert, features, tmp_path):
    cfg = bert_config(
        tiny_bert,
        tmp_path,
        method={"name": "freeze", "train_layers": 1, "unfreeze": {"every_steps": 2}},
        train={"max_steps": 6},
    )
    trainer, method, rec = _run(cfg, features, tmp_path)
    groups = _params_by_group(method, trainer.model)
    assert method.unfreezing.stages == [[HEAD], ["block.1"]]
    assert {g["group"] for g in trainer.optimizer.param_groups} == {HEAD, "block.1"}
    for u in rec.updates:
        expected = _names(groups, HEAD, *(["block.1"] if u.step >= 2 else []))
        assert u.with_grad == expected
        assert rec.trainable_at_start[u.step] == expected


def test_every_epochs_uses_steps_per_epoch(tiny_bert, features, tmp_path):
    # 32 examples, batch 8: 4 steps per epoch.
    cfg = bert_config(
        tiny_bert,
        tmp_path,
        method={"name": "full", "unfreeze": {"every_epochs": 1}},
        train={"epochs": 3},
    )
    trainer, method, rec = _run(cfg, features, tmp_path)
    assert trainer.steps_per_epoch == 4
    assert method.unfreezing.interval == 4
    groups = _params_by_group(method, trainer.model)
    release = {HEAD: 0, "block.1": 4, "block.0": 8, EMBEDDINGS: 12}
    assert [u.step for u in rec.updates] == list(range(12))
    for u in rec.updates:
        released = [g for g, start in release.items() if u.step >= start]
        assert u.with_grad == _names(groups, *released), u.step
        if u.step == 0:
            continue  # see test_every_epochs_lr_is_zero_at_the_first_step
        for name, lr in u.lr.items():
            expected = 1e-2 if u.step >= release[name.removesuffix("/no_decay")] else 0.0
            assert lr == expected, (name, u.step)
    final = dict(trainer.model.named_parameters())
    for name in groups[EMBEDDINGS]:
        assert torch.equal(final[name], rec.updates[0].weights[name])  # its turn never came


def test_every_epochs_lr_is_zero_at_the_first_step(tiny_bert, features, tmp_path):
    cfg = bert_config(
        tiny_bert,
        tmp_path,
        method={"name": "full", "unfreeze": {"every_epochs": 1}},
        train={"epochs": 1},
    )
    _, _, rec = _run(cfg, features, tmp_path)
    first = rec.updates[0]
    assert first.step == 0
    frozen = {n: lr for n, lr in first.lr.items() if not n.startswith(HEAD)}
    assert frozen and all(lr == 0.0 for lr in frozen.values()), frozen


def test_release_is_logged(tiny_bert, features, tmp_path):
    from tunesmith.training.monitor import read_metrics

    cfg = bert_config(
        tiny_bert,
        tmp_path,
        method={"name": "full", "unfreeze": {"every_steps": 2}},
        train={"max_steps": 5},
    )
    _run(cfg, features, tmp_path, log_metrics=True)
    unfrozen = [
        (r["step"], r["unfrozen"])
        for r in read_metrics(tmp_path / "metrics.jsonl")
        if "unfrozen" in r
    ]
    assert unfrozen == [(2, "block.1"), (4, "block.0")]


@pytest.mark.parametrize(
    "unfreeze",
    [{"every_steps": 2, "every_epochs": 1}, {"start_layers": 1}, {"every_steps": 0}],
    ids=["both", "neither", "zero"],
)
def test_unfreeze_config_errors(tiny_bert, tmp_path, unfreeze):
    with pytest.raises(ConfigError, match="unfreeze"):
        bert_config(tiny_bert, tmp_path, method={"name": "full", "unfreeze": unfreeze})
