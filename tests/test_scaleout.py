"""What each scale-out layout refuses, and how a run learns its layout (no processes needed).

The multi-process runs themselves are in test_fsdp.py, test_deepspeed.py,
test_ddp.py and test_multinode.py; these checks are the cheap part: a setting
a layout would silently not honour stops the run before training, naming it.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from conftest import tiny_config
from tunesmith.config.root import Config
from tunesmith.errors import ConfigError
from tunesmith.objectives.objective import Objective
from tunesmith.tasks.base import get_task
from tunesmith.training import deepspeed_cpu, sharding
from tunesmith.training.scaleout import DeepSpeedZero, Replicated, Sharded, scale_out


def config(tmp_path, **sections) -> Config:
    return Config.from_dict(
        tiny_config(tmp_path, tmp_path / "train.csv", tmp_path / "o", **sections)
    )


def accelerator(kind: DistributedType, processes: int = 2, **state) -> SimpleNamespace:
    """The parts of an ``accelerate.Accelerator`` the layouts read."""
    return SimpleNamespace(
        state=SimpleNamespace(distributed_type=kind, **state),
        distributed_type=kind,
        num_processes=processes,
        mixed_precision="no",
    )


def test_each_launch_gets_its_layout():
    assert type(scale_out(accelerator(DistributedType.NO, 1))) is Replicated
    assert type(scale_out(accelerator(DistributedType.MULTI_CPU))) is Replicated
    assert type(scale_out(accelerator(DistributedType.FSDP))) is Sharded
    assert type(scale_out(accelerator(DistributedType.DEEPSPEED))) is DeepSpeedZero


def test_fsdp_on_cpu_is_still_known_after_accelerate_reverts_the_type():
    # accelerate copies the process-level MULTI_CPU back into its state whenever
    # AcceleratorState() is instantiated again: the plugin is what stays.
    reverted = accelerator(DistributedType.MULTI_CPU, fsdp_plugin=object())
    assert sharding.is_sharded(reverted)
    assert type(scale_out(reverted)) is Sharded
    assert not sharding.is_sharded(accelerator(DistributedType.MULTI_CPU, fsdp_plugin=None))


@pytest.mark.parametrize(
    ("sections", "hooks", "mixed", "named"),
    [
        ({}, [object()], True, "progressive unfreezing"),
        ({}, [], False, "batches that train one head each"),  # multi-task
        ({"method": {"name": "lora", "quantize_base": "nf4"}}, [], True, "method.quantize_base"),
    ],
    ids=["hooks", "multitask", "qlora"],
)
def test_partitioned_training_refuses_what_it_cannot_split(tmp_path, sections, hooks, mixed, named):
    cfg = config(tmp_path, **sections)
    task = SimpleNamespace(mixed_batches=mixed)
    with pytest.raises(ConfigError, match="FSDP.*does not support: .*" + named):
        sharding.check_shardable(cfg, task, hooks, Objective(), engine="FSDP")
    # The plain case passes.
    sharding.check_shardable(
        config(tmp_path), get_task(config(tmp_path)), [], Objective(), engine="FSDP"
    )


def test_regularisers_are_refused(tmp_path):
    cfg = config(tmp_path)
    with pytest.raises(ConfigError, match="regularize"):
        sharding.check_shardable(
            cfg, get_task(cfg), [], Objective(regularisers=[object()]), engine="FSDP"
        )


def test_deepspeed_names_every_setting_its_engine_would_not_honour(tmp_path):
    cfg = config(tmp_path, optim={"clip_mode": "per_group", "max_grad_norm": 1.0})
    problems = " ".join(deepspeed_cpu.unsupported(accelerator(DistributedType.DEEPSPEED), cfg))
    assert "optim.clip_mode per_group" in problems
    assert "train.save_steps and train.save_minutes" in problems  # save_minutes: 30 by default
    plain = config(tmp_path, train={"save_minutes": None, "precision": "fp32"})
    assert deepspeed_cpu.unsupported(accelerator(DistributedType.DEEPSPEED), plain) == []


def test_a_cpu_launch_joins_its_processes_or_stops(monkeypatch):
    # Without a GPU and without ACCELERATE_USE_CPU, accelerate would leave each
    # launched process alone, all writing the same run folder.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    sharding.join_cpu_processes()
    assert os.environ["ACCELERATE_USE_CPU"] == "true"
    with pytest.raises(ConfigError, match="started 2 processes but accelerate joined 1"):
        sharding.check_joined(accelerator(DistributedType.NO, processes=1))
    sharding.check_joined(accelerator(DistributedType.MULTI_CPU, processes=2))
