"""DeepSpeed ZeRO-2/3 (accelerate) on 2 CPU processes equals 1 process over the same global batch.

DeepSpeed's CPU accelerator talks over gloo when oneCCL is not installed, so
the engine runs for real here: ``torchrun`` with accelerate's DeepSpeed
environment (what ``accelerate launch --use_deepspeed`` sets), without
``ACCELERATE_USE_CPU`` (with it accelerate never turns DeepSpeed on). The
engine averages gradients over processes like DDP, so the loop's global-target
normaliser keeps the update identical to one process with twice the batch;
ZeRO-3 partitions the weights, so ``final/`` is written from gathered ones.
What the loop needs for it is ``tunesmith.training.deepspeed_cpu``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from distributed_fixtures import TORCHRUN, assert_trained, ddp_config, launch, max_diff
from tunesmith.api import train
from tunesmith.config.root import Config

pytest.importorskip("deepspeed")

FINAL = Path("final") / "model.safetensors"


@pytest.fixture(scope="module")
def one_process(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``final/model.safetensors`` of the single-process run with the global batch of 8."""
    tmp = tmp_path_factory.mktemp("ds-one")
    train(Config.from_dict(ddp_config(tiny_bert, tmp, tmp / "one", batch_size=8)), progress=False)
    return tmp / "one" / FINAL


@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed")
@pytest.mark.parametrize(
    ("stage", "batch_size", "grad_accum"),
    [(2, 4, 1), (3, 2, 2)],  # ZeRO-3 also checks the accumulation boundary
    ids=["zero2", "zero3-accum2"],
)
def test_deepspeed_two_processes_equal_one_process(
    tiny_bert, one_process, tmp_path, stage, batch_size, grad_accum
):
    cfg = ddp_config(tiny_bert, tmp_path, tmp_path / "two", batch_size, grad_accum=grad_accum)
    path = tmp_path / "ds.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(
        DS_ACCELERATOR="cpu",
        ACCELERATE_USE_DEEPSPEED="true",
        ACCELERATE_DEEPSPEED_ZERO_STAGE=str(stage),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    if stage == 3:
        # A DeepSpeed config file, as ``accelerate launch`` passes one. ZeRO-3 leaves
        # parameters under 1e5 elements whole (persistence threshold: all of the tiny
        # model's) and keeps gathered ones cached after a forward; with these at 0
        # every parameter is an empty partition at save time, so saving must gather
        # (without it final/ silently holds 0-element tensors).
        zero = {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": 0,
            "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 0,
        }
        ds_json = tmp_path / "ds.json"
        ds_json.write_text(json.dumps({"zero_optimization": zero, "gradient_clipping": "auto"}))
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(ds_json)
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "2"]
    output = launch([*command, "-m", "tunesmith", "train", str(path), "--no-progress"], env)
    # The engine really ran (not a silent fallback to plain data parallel).
    assert f"DeepSpeed ZeRO-{stage} on 2 processes" in output
    assert max_diff(one_process, tmp_path / "two" / FINAL) <= 1e-5
    assert_trained(tiny_bert, one_process)
