"""``tunesmith estimate --processes N --shard ...``: each rank's model states.

Checked two ways: against DeepSpeed's own estimators for fully trained models
in its mixed precision (like with like: where its accounting leaves a part
out, the comparison leaves it out too, said at each place), and against the
local shards a real 2-process FSDP2 step holds (tests/fsdp_memory_worker.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import tiny_config, toy_rows, write_csv
from tunesmith.cli import main
from tunesmith.config.root import Config
from tunesmith.errors import ConfigError
from tunesmith.inspect.sharding import STATES, Part, RankMemory, Sharding, per_rank

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
WORKER = Path(__file__).with_name("fsdp_memory_worker.py")
#: A GPT-2-sized model and its largest layer (the token embedding), for DeepSpeed's zero3 term.
GPT2_PARAMS, GPT2_LARGEST = 124_439_808, 38_597_376
PROCESSES = (1, 2, 3, 4, 8, 16)


def without(mem: RankMemory, leave_out: Callable[[Part], bool] | None = None, *, cpu: bool) -> int:
    """Bytes on the device (or the CPU) minus the parts ``leave_out`` picks."""
    return sum(
        size
        for part, size in mem.parts
        if part.offloaded == cpu and not (leave_out and leave_out(part))
    )


def sixteen_bit_weights(part: Part) -> bool:
    return part.state == "weights"


def sixteen_bit_gradients(part: Part) -> bool:
    return part.state == "gradients" and part.per_param == 2


@pytest.fixture(scope="module")
def deepspeed_estimators():
    with pytest.MonkeyPatch.context() as env:  # deepspeed picks its accelerator on import
        env.setenv("DS_ACCELERATOR", "cpu")
        pytest.importorskip("deepspeed")
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("processes", PROCESSES)
def test_zero2_matches_deepspeed(deepspeed_estimators, precision: str, processes: int):
    zero2, _ = deepspeed_estimators
    p, factor = GPT2_PARAMS, 1.5
    # Without offload: 2 P of 16-bit weights + 18 P / N, the same parts on both sides.
    ours = per_rank(p, p, precision, Sharding("zero2", processes))
    _, gpu = zero2(p, num_gpus_per_node=processes, cpu_offload=False)
    assert ours.cpu == dict.fromkeys(STATES, 0)
    assert without(ours, cpu=False) == pytest.approx(gpu, rel=0.05)
    # Offload: only the 16-bit weights stay on the device.
    ours = per_rank(p, p, precision, Sharding("zero2", processes, offload=True))
    cpu, gpu = zero2(p, num_gpus_per_node=processes, cpu_offload=True)
    assert without(ours, cpu=False) == pytest.approx(gpu, rel=0.05)
    # DeepSpeed's CPU figure is the node's, times a 1.5 buffer factor, and at least 4 P
    # per process: the fp32 model each process loads before partitioning (not a model
    # state of training). Below 4 processes it is the 16 P/N per rank we count, N times.
    if 4 * processes < 16:
        node = without(ours, cpu=True) * processes * factor
        assert node == pytest.approx(cpu, rel=0.05)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("processes", PROCESSES)
def test_zero3_matches_deepspeed(deepspeed_estimators, precision: str, processes: int):
    _, zero3 = deepspeed_estimators
    p, largest, factor = GPT2_PARAMS, GPT2_LARGEST, 1.5
    # DeepSpeed adds 4 bytes per parameter of the largest layer (its gathered 16-bit weights
    # and gradients while it is computed): not a sharded model state, so it is taken off
    # (the estimators return it as their third value). Its per-parameter total is 18 where
    # the buffers ZeRO-3 allocates add to 20 (16-bit weight shard 2, 16-bit gradient
    # partition ``grad_partitions_flat_buffer`` 2, fp32 gradient copy 4, fp32 master 4,
    # moments 8): without offload it leaves out the 16-bit weight shard (which its
    # optimizer-offload branch does count on the GPU, as 2 P / N) ...
    ours = per_rank(p, p, precision, Sharding("zero3", processes))
    _, gpu, gathered = zero3(p, largest, num_gpus_per_node=processes, cpu_offload=False)
    assert without(ours, sixteen_bit_weights, cpu=False) == pytest.approx(gpu - gathered, rel=0.05)
    assert sum(ours.device.values()) == pytest.approx(20 * p / processes, rel=1e-6)
    # ... with weights and optimizer offloaded, nothing stays on the device but the gathered
    # layer, and its CPU figure (zero.Init, the node's, times 1.5) leaves out the 16-bit
    # gradient partition.
    ours = per_rank(p, p, precision, Sharding("zero3", processes, offload=True))
    cpu, gpu, gathered = zero3(
        p, largest, num_gpus_per_node=processes, cpu_offload=True, cpu_offload_params=True
    )
    assert sum(ours.device.values()) == gpu - gathered == 0
    node = without(ours, sixteen_bit_gradients, cpu=True) * processes * factor
    assert node == pytest.approx(cpu, rel=0.05)


def test_arithmetic_counts_frozen_weights_only_where_it_should():
    """LoRA-like: 1% trained. Frozen weights are sharded by zero3/fsdp, nothing else."""
    total, trained = 1_000_000, 10_000
    ddp = per_rank(total, trained, "fp32", Sharding("ddp", 4))
    assert ddp.device == {"weights": 4 * total, "gradients": 8 * trained, "optimizer": 8 * trained}
    fsdp = per_rank(total, trained, "bf16", Sharding("fsdp", 4))  # accelerate keeps fp32 shards
    assert fsdp.device == {"weights": total, "gradients": trained, "optimizer": 2 * trained}
    zero2 = per_rank(total, trained, "bf16", Sharding("zero2", 4, offload=True))
    assert zero2.device == {"weights": 2 * total, "gradients": 0, "optimizer": 0}
    assert zero2.cpu == {"weights": 0, "gradients": trained, "optimizer": 3 * trained}
    zero3 = per_rank(total, trained, "fp16", Sharding("zero3", 4, offload=True))
    assert sum(zero3.device.values()) == 0
    assert zero3.cpu == {
        "weights": total // 2,
        "gradients": 6 * trained // 4,
        "optimizer": 3 * trained,
    }
    # One process: every kind keeps everything, in its own layout (DeepSpeed: 16-bit copies).
    one = per_rank(total, total, "bf16", Sharding("zero3", 1))
    assert sum(one.device.values()) == 20 * total
    assert (
        per_rank(total, total, "fp32", Sharding("fsdp", 1)).device
        == per_rank(total, total, "fp32", Sharding("none", 1)).device
    )


def test_nonsense_is_refused():
    with pytest.raises(ConfigError, match="at least 1 process"):
        Sharding("ddp", processes=0)
    with pytest.raises(ConfigError, match="add --shard zero2, zero3 or fsdp"):
        Sharding.from_options(1, None, offload=True)
    with pytest.raises(ConfigError, match="add --shard"):
        Sharding.from_options(4, "ddp", offload=True)
    with pytest.raises(ConfigError, match="choose one of"):
        Sharding("zero4", 2)
    assert Sharding.from_options(1, None, offload=False) is None
    assert Sharding.from_options(2, None, offload=False) == Sharding("ddp", 2)


def check_against_measured(
    measured: list[dict[str, int]], total: int, trained: int, precision: str, kind: str, rel: float
) -> dict[str, tuple[int, int]]:
    """Compare each rank's measured model-state bytes with the arithmetic; returns what it compared.

    ``measured``: one dict per rank with ``weights``, ``gradients`` and
    ``optimizer`` bytes of that rank's local shards (device and CPU together).
    The ranks together must hold exactly one copy, but for AdamW's step counters
    (4 bytes per trained tensor, on every rank): checked to within 1%. The
    fullest rank must be within ``rel`` of the per-rank arithmetic, which
    splits the total evenly: FSDP splits each tensor by its first dimension,
    so with an odd one (7 rows: 4 and 3) rank 0 holds a little more.
    """
    ranks = len(measured)
    ours = per_rank(total, trained, precision, Sharding(kind, ranks))
    whole = per_rank(total, trained, precision, Sharding(kind, 1))
    compared = {}
    for state in STATES:
        expected = ours.device[state] + ours.cpu[state]
        fullest = max(m[state] for m in measured)
        together = sum(m[state] for m in measured)
        assert together == pytest.approx(whole.device[state] + whole.cpu[state], rel=0.01), state
        assert fullest == pytest.approx(expected, rel=rel), state
        compared[state] = (fullest, expected)
    return compared


@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed")
def test_fsdp_matches_measured_local_shards(tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    measured = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    total, trained = measured[0]["total"], measured[0]["trained"]
    assert 0 < trained < total  # a frozen part and a trained part
    compared = check_against_measured(measured, total, trained, "fp32", "fsdp", rel=0.03)
    # 9,959 parameters, 4,615 trained: rank 0 holds 20,112 / 9,360 / 18,736 bytes
    # where the even split gives 19,920 / 9,232 / 18,464.
    assert compared["weights"][1] == 4 * -(-total // 2)


def _config(tiny_bert: Path, tmp_path: Path) -> Path:
    data = write_csv(tmp_path / "d.csv", toy_rows(40))
    cfg = Config.from_dict(
        tiny_config(
            tiny_bert,
            data,
            tmp_path / "run",
            method={"name": "lora", "r": 2},
            train={"batch_size": 8, "precision": "fp32", "epochs": 1},
        )
    )
    path = tmp_path / "c.yaml"
    cfg.save(path)
    return path


def test_cli_per_rank_table_and_json(tiny_bert: Path, tmp_path: Path, capsys):
    path = _config(tiny_bert, tmp_path)
    args = ["estimate", str(path), "--steps", "1", "--processes", "4", "--shard", "zero3"]
    assert main([*args, "--offload", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rank = data["per_rank"]
    assert (rank["kind"], rank["processes"], rank["offload"]) == ("zero3", 4, True)
    total, trained = data["total_parameters"], data["trainable_parameters"]
    expected = per_rank(total, trained, "fp32", Sharding("zero3", 4, offload=True))
    assert rank["cpu"] == expected.cpu and rank["device_total"] == 0
    assert rank["cpu_total"] == sum(expected.cpu.values())
    # The unsharded arithmetic agrees with the tensors the estimate measured (those also
    # count buffers and AdamW's step counters).
    plain = per_rank(total, trained, "fp32", Sharding("none", 1)).device
    for state in STATES:
        assert plain[state] == pytest.approx(data["memory"][state], rel=0.02), state

    assert main(args) == 0
    text = capsys.readouterr().out
    assert "per rank (zero3, 4 processes, fp32): model states" in text
    assert "1/4 each" in text and "gathered one at a time" in text


def test_cli_refuses_before_building_the_run(tmp_path: Path, capsys):
    missing = tmp_path / "never-read.yaml"
    assert main(["estimate", str(missing), "--offload"]) == 2
    assert "add --shard zero2, zero3 or fsdp" in capsys.readouterr().err
    assert main(["estimate", str(missing), "--processes", "0", "--shard", "fsdp"]) == 2
    assert "at least 1 process" in capsys.readouterr().err
