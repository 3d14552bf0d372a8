"""``tunesmith launch``: the rendered per-node command and SLURM script, flag by flag.

Fast: nothing is started here (``test_multinode.py`` runs the rendered torchrun
line for real). The config's model and data need not exist: launching only
validates the config, the nodes read the files.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from helpers import cli_fails
from tunesmith.cli import main
from tunesmith.config.root import Config
from tunesmith.errors import ConfigError
from tunesmith.runs.launch import (
    Shell,
    check_accelerate_config,
    node_command,
    plan,
    slurm_script,
)

TRAIN = ["-m", "tunesmith", "train"]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A valid config in a folder with a space, its run folder named ``my run``."""
    folder = tmp_path / "my configs"
    folder.mkdir()
    path = folder / "cfg.yaml"
    path.write_text(
        "model: {name_or_path: models/tiny}\n"
        "data: {train: data/train.csv}\n"
        "train: {output_dir: runs/my run, num_threads: 4}\n"
    )
    return path


def launch_output(capsys, args: list[str]) -> tuple[str, str]:
    """stdout and stderr of a successful ``tunesmith launch``."""
    assert main(["launch", *args]) == 0
    out = capsys.readouterr()
    return out.out, out.err


def test_torchrun_command_has_the_rendezvous_and_quotes_the_path(capsys, config):
    out, err = launch_output(
        capsys, [str(config), "--nodes", "2", "--main-address", "10.0.0.5", "--port", "29600"]
    )
    assert shlex.split(out) == [
        "torchrun",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "10.0.0.5:29600",
        "--rdzv_id",
        "my-run",  # the run folder's name, made a valid id
        *TRAIN,
        str(config),
    ]
    assert f"'{config}'" in out  # one word for the shell, space and all
    assert "--node_rank" not in out  # c10d numbers the nodes; torchrun would ignore it
    assert "MASTER_ADDR" not in err  # the address was given


def test_address_left_to_each_node_and_overrides_passed_on(capsys, config):
    out, err = launch_output(
        capsys,
        [str(config), "optim.lr=3e-5", "--nodes", "4", "--processes-per-node", "8"],
    )
    assert '--rdzv_endpoint "$MASTER_ADDR:29500"' in out
    assert "--nnodes 4 --nproc_per_node 8" in out
    assert out.rstrip().endswith("optim.lr=3e-5")
    assert "MASTER_ADDR" in err


def test_accelerate_command_needs_each_nodes_rank(capsys, config, tmp_path):
    accelerate = tmp_path / "fsdp.yaml"
    accelerate.write_text("distributed_type: FSDP\nmixed_precision: bf16\n")
    args = [str(config), "--nodes", "2", "--processes-per-node", "4", "--main-address", "node0"]
    out, err = launch_output(capsys, [*args, "--accelerate-config", str(accelerate)])
    assert out.startswith(
        f"accelerate launch --config_file {accelerate} --num_machines 2 --num_processes 8 "
        '--machine_rank "$NODE_RANK" --main_process_ip node0 --main_process_port 29500 '
        f"-m tunesmith train '{config}'"
    )
    assert "NODE_RANK" in err


def test_accelerate_on_cpus_is_refused(capsys, config, tmp_path):
    # On CPUs accelerate launch leaves joining the machines to mpirun: each node
    # would train alone into the same run folder.
    accelerate = tmp_path / "cpu.yaml"
    accelerate.write_text("distributed_type: MULTI_CPU\nuse_cpu: true\n")
    args = [str(config), "--nodes", "2", "--accelerate-config", str(accelerate)]
    cli_fails(capsys, ["launch", *args], "--accelerate-config", "mpirun", "torchrun")
    with pytest.raises(ConfigError, match="CPUs"):
        check_accelerate_config({"use_cpu": True}, "x.yaml")
    check_accelerate_config({"distributed_type": "MULTI_GPU"}, "x.yaml")


def test_missing_accelerate_config_fails_here(capsys, config, tmp_path):
    args = [str(config), "--nodes", "2", "--accelerate-config", str(tmp_path / "nope.yaml")]
    cli_fails(capsys, ["launch", *args], "--accelerate-config", "nope.yaml")


def test_slurm_script(capsys, config):
    args = [str(config), "--nodes", "3", "--processes-per-node", "2", "--slurm"]
    script, err = launch_output(capsys, args)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=my-run",
        "#SBATCH --nodes=3",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=8",  # 2 processes x train.num_threads 4
        "#SBATCH --output=my-run-%j.log",
    ]
    assert "##SBATCH --gpus-per-node=2" in lines  # disabled until the nodes have GPUs
    # sbatch stops reading directives at the first command.
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert (
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in lines
    )
    assert "export OMP_NUM_THREADS=4" in lines
    srun = lines[-1]
    assert srun.startswith("srun --kill-on-bad-exit=1 torchrun --nnodes 3 --nproc_per_node 2 ")
    assert '--rdzv_endpoint "$MASTER_ADDR:29500" --rdzv_id "$SLURM_JOB_ID"' in srun
    assert srun.endswith(f"-m tunesmith train '{config}' --no-progress")
    assert "sbatch" in err


def test_slurm_accelerate_rank_is_expanded_on_each_node(config):
    cfg = Config.load(config)
    launch = plan(cfg, config, 2, accelerate_config="acc.yaml", progress=False)
    srun = slurm_script(launch).splitlines()[-1]
    inner = shlex.split(srun)[-1]  # bash -c '<the node's command>'
    assert shlex.split(srun)[:4] == ["srun", "--kill-on-bad-exit=1", "bash", "-c"]
    assert '--machine_rank "$SLURM_NODEID"' in inner
    assert '--main_process_ip "$MASTER_ADDR"' in inner
    assert shlex.split(inner)[-3:] == ["train", str(config), "--no-progress"]
    assert inner == node_command(launch, node_rank=Shell('"$SLURM_NODEID"'))


def test_slurm_without_threads_leaves_cpus_to_fill_in(capsys, config):
    config.write_text(config.read_text().replace(", num_threads: 4", ""))
    script, _ = launch_output(capsys, [str(config), "--nodes", "2", "--slurm"])
    assert "##SBATCH --cpus-per-task=CPUS" in script.splitlines()
    assert "#SBATCH --cpus-per-task" not in script.replace("##SBATCH", "")


def test_slurm_refuses_a_main_address(capsys, config):
    args = [str(config), "--nodes", "2", "--slurm", "--main-address", "node0"]
    cli_fails(capsys, ["launch", *args], "--main-address", "first node")


def test_output_file(capsys, config, tmp_path):
    target = tmp_path / "job.sbatch"
    out, err = launch_output(
        capsys, [str(config), "--nodes", "2", "--slurm", "--output", str(target)]
    )
    assert out == ""
    assert target.read_text().startswith("#!/bin/bash\n")
    assert str(target) in err


def test_bad_config_fails_with_its_usual_error(capsys, config):
    config.write_text(config.read_text() + "optim: {lr: -1}\n")
    cli_fails(capsys, ["launch", str(config), "--nodes", "2"], "cfg.yaml", "optim.lr")


def test_online_task_is_refused_on_several_processes(capsys, config):
    rl = ["task.type=rl", "rl.rewards=[{type: length}]"]
    cli_fails(
        capsys, ["launch", str(config), *rl, "--nodes", "2"], "task.type", "rl", "one process"
    )
    main(["launch", str(config), *rl, "--nodes", "1"])  # one process: fine
    assert capsys.readouterr().out.startswith("torchrun --nnodes 1 --nproc_per_node 1 ")


def test_counts_are_checked_without_the_cli(config):
    cfg = Config.load(config)
    with pytest.raises(ConfigError) as err:
        plan(cfg, config, 0, 0, port=70000)
    assert [line.split(":")[0] for line in str(err.value).splitlines()] == [
        "--nodes",
        "--processes-per-node",
        "--port",
    ]
