"""What the scale-out tests share: the config of a run split over several processes.

Why apart: the DDP, FSDP and DeepSpeed tests (one machine) and the multi-node
test (two launchers) must train the very same run, so they build it in one place.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import tiny_config, toy_rows, write_csv

#: The launcher next to this interpreter (the virtualenv's), found even off PATH.
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


def ddp_config(model: Path, tmp: Path, out: Path, batch_size: int, **train: object) -> dict:
    """64 training rows: 8 global batches of 8 per epoch, no wrap-around on 2 processes.

    ``train``: more ``train.*`` settings (accumulation, checkpoints...).
    """
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
            **train,
        },
    )
    # A test split too: the main process alone reloads best/ for it after training,
    # which must work under every layout (ZeRO-3 would partition the reload).
    test_csv = write_csv(tmp / "test.csv", toy_rows(16, seed=5))
    cfg["data"].update(validation=str(val_csv), test=str(test_csv), group_by_length=False)
    return cfg


def launcher_env() -> dict[str, str]:
    """The environment of a launched run: CPU processes (gloo), offline, one thread each.

    The interpreter's folder goes first on PATH so a rendered ``torchrun`` is
    this virtualenv's.
    """
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {
        **os.environ,
        "PATH": path,
        "ACCELERATE_USE_CPU": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


def launch(command: list[str], env: dict[str, str], timeout: float = 300) -> str:
    """Run a launcher command to the end; its output (stdout and stderr), failing on an error."""
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def max_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between two safetensors files with the same tensors."""
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    assert all(ta[k].shape == tb[k].shape for k in ta), "a file holds partitions, not whole tensors"
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


def assert_trained(model: Path, final: Path) -> None:
    """Most of the base model's tensors moved in ``final`` (the runs really trained)."""
    base, trained = load_file(model / "model.safetensors"), load_file(final)
    moved = [k for k in base if not torch.equal(base[k], trained.get(f"bert.{k}", base[k]))]
    assert len(moved) > len(base) // 2, "the runs did not train"
