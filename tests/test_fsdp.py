"""FSDP2 (accelerate) on 2 CPU processes: the same weights as 1 process, sharded checkpoints.

The runs are real ``accelerate launch`` runs with the shipped CPU config
(examples/accelerate/fsdp_cpu.yaml: FSDP2, gloo, fp32, sharded state dicts).
What they check, each of which fails when its part breaks:

* the weights equal one process over the same global batch (full fine-tuning
  and LoRA), which needs gloo's AVG-as-SUM reduction fixed (PyTorch #162338:
  without the fix every gradient is twice too large);
* per-group clipping and the logged per-group gradient norms are those of the
  whole gradients, not of one process's shards;
* a run resumed from a mid-epoch sharded checkpoint (written through
  ``torch.distributed.checkpoint``, one safetensors file per process) ends
  bit-identical to the uninterrupted run;
* ``best/`` and ``final/`` are the usual whole folders, gathered.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from distributed_fixtures import assert_trained, ddp_config, launch, launcher_env, max_diff
from tunesmith.api import train
from tunesmith.config.root import Config
from tunesmith.training.monitor import read_metrics

ACCELERATE = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
FSDP_CONFIG = Path(__file__).parents[1] / "examples" / "accelerate" / "fsdp_cpu.yaml"

pytestmark = pytest.mark.skipif(not Path(ACCELERATE).exists(), reason="accelerate CLI missing")


def fsdp_train(cfg: dict, tmp: Path, *extra: str) -> str:
    """``tunesmith train`` on 2 FSDP processes; its output."""
    path = tmp / f"fsdp-{len(list(tmp.glob('fsdp-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    command = [ACCELERATE, "launch", "--config_file", str(FSDP_CONFIG), "-m", "tunesmith"]
    # As a user runs it: accelerate launch does not pass the config's use_cpu on for
    # FSDP, so tunesmith must join the CPU processes itself.
    env = {k: v for k, v in launcher_env().items() if k != "ACCELERATE_USE_CPU"}
    return launch([*command, "train", str(path), "--no-progress", *extra], env)


def grad_norms(run: Path) -> list[dict[str, float]]:
    """The per-group gradient norms logged at every step."""
    records = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    return [{k: v for k, v in r.items() if k.startswith("grad_norm/")} for r in records]


def test_full_fine_tuning_equals_one_process_and_resumes_bit_identically(tiny_bert, tmp_path):
    def config(out: str, batch_size: int) -> dict:
        cfg = ddp_config(
            tiny_bert, tmp_path, tmp_path / out, batch_size, save_steps=3, save_total_limit=10
        )
        cfg["train"]["grad_norm_steps"] = 1
        # Small enough that every group is clipped: clipping by shard norms would differ.
        cfg["optim"].update(clip_mode="per_group", max_grad_norm=0.01)
        return cfg

    train(Config.from_dict(config("one", 8)), progress=False)
    assert "training through FSDP on 2 processes" in fsdp_train(config("two", 4), tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    final = Path("final") / "model.safetensors"
    assert max_diff(one / final, two / final) <= 1e-5
    assert_trained(tiny_bert, one / final)
    # Norms of the whole gradients (a shard's would be about 1/sqrt(2) of them).
    norms_one, norms_two = grad_norms(one), grad_norms(two)
    assert len(norms_one) == len(norms_two) == 16 and len(norms_one[0]) > 2
    for a, b in zip(norms_one, norms_two, strict=True):
        assert a.keys() == b.keys()
        assert all(abs(a[k] - b[k]) <= 1e-4 * max(1.0, a[k]) for k in a), (a, b)
    # The checkpoints hold shards (one safetensors file per process), nothing pickled.
    step6 = two / "checkpoints" / "step-0000006"
    shards = sorted(p.name for p in (step6 / "shards").iterdir())
    assert len([n for n in shards if n.endswith(".safetensors")]) == 2, shards
    assert not list(step6.rglob("*.pt")) and not list(step6.rglob("*.bin"))
    # best/ is a whole folder too.
    assert load_file(two / "best" / "model.safetensors").keys() == load_file(one / final).keys()

    # Resume from the mid-epoch checkpoint at step 6 (of 8 per epoch), as if killed there.
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed, ignore=shutil.ignore_patterns("final", "best"))
    for later in (resumed / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > 6:
            shutil.rmtree(later)
    again = config("resumed", 4)
    fsdp_train(again, tmp_path, "--resume", "latest")
    a, b = load_file(two / final), load_file(resumed / final)
    assert all(a[k].equal(b[k]) for k in a), "resumed FSDP run is not bit-identical"


def test_lora_equals_one_process(tiny_bert, tmp_path):
    def config(out: str, batch_size: int) -> dict:
        cfg = ddp_config(tiny_bert, tmp_path, tmp_path / out, batch_size)
        # No adapter dropout: each process draws its own masks, one process others.
        cfg["method"] = {"name": "lora", "dropout": 0.0}
        return cfg

    train(Config.from_dict(config("one", 8)), progress=False)
    fsdp_train(config("two", 4), tmp_path)
    adapter = Path("final") / "adapter_model.safetensors"
    assert max_diff(tmp_path / "one" / adapter, tmp_path / "two" / adapter) <= 1e-5
    base = load_file(tmp_path / "one" / adapter)
    assert any(v.abs().max() > 0 for k, v in base.items() if "lora_B" in k), "LoRA did not train"
