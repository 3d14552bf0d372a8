"""Scale-out through accelerate: 2 processes (gloo, CPU) equal 1 process over the same global batch.

The loop normalises every micro-batch's loss by the number of targets of the
whole global batch (all processes), so the gradient DDP averages is the one
big-batch gradient: the final weights match a single process with a batch
twice the size.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config, toy_rows, write_csv
from tunesmith.api import train
from tunesmith.config.root import Config

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


def ddp_config(model: Path, tmp: Path, out: Path, batch_size: int) -> dict:
    """64 training rows: 8 global batches of 8 per epoch, no wrap-around on 2 processes."""
    train_csv = write_csv(tmp / "train.csv", toy_rows(64))
    val_csv = write_csv(tmp / "val.csv", toy_rows(16, seed=4))
    cfg = tiny_config(
        model,
        train_csv,
        out,
        optim={"lr": 1e-3, "scheduler": "linear", "warmup_ratio": 0.1},
        train={
            "epochs": 2,
            "batch_size": batch_size,
            "precision": "fp32",
            "num_threads": 1,
            "save_minutes": None,
        },
    )
    cfg["data"].update(validation=str(val_csv), group_by_length=False)
    return cfg


@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed")
def test_two_processes_equal_one_process_over_the_same_global_batch(tiny_bert, tmp_path):
    single = ddp_config(tiny_bert, tmp_path, tmp_path / "one", batch_size=8)
    train(Config.from_dict(single), progress=False)

    double = ddp_config(tiny_bert, tmp_path, tmp_path / "two", batch_size=4)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(double))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            TORCHRUN,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "tunesmith",
            "train",
            str(path),
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, worst
    base = load_file(tiny_bert / "model.safetensors")
    trained = [k for k in base if f"bert.{k}" in a and not torch.equal(base[k], a[f"bert.{k}"])]
    assert len(trained) > len(base) // 2, "the runs did not train"
