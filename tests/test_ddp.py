"""Scale-out through accelerate: 2 processes (gloo, CPU) equal 1 process over the same global batch.

The loop normalises every micro-batch's loss by the number of targets of the
whole global batch (all processes), so the gradient DDP averages is the one
big-batch gradient: the final weights match a single process with a batch
twice the size.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from distributed_fixtures import TORCHRUN, assert_trained, ddp_config, launch, max_diff
from tunesmith.api import train
from tunesmith.config.root import Config


@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed")
def test_two_processes_equal_one_process_over_the_same_global_batch(tiny_bert, tmp_path):
    single = ddp_config(tiny_bert, tmp_path, tmp_path / "one", batch_size=8)
    train(Config.from_dict(single), progress=False)

    double = ddp_config(tiny_bert, tmp_path, tmp_path / "two", batch_size=4)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(double))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "2"]
    launch([*command, "-m", "tunesmith", "train", str(path), "--no-progress"], env)
    final = Path("final") / "model.safetensors"
    assert max_diff(tmp_path / "one" / final, tmp_path / "two" / final) <= 1e-5
    assert_trained(tiny_bert, tmp_path / "one" / final)
