"""The commands that start one training run on several machines: per node, and as a SLURM job.

Why a module of its own: a multi-node run is the single-process ``tunesmith
train`` started by a launcher on every node, and the launcher's flags (node
count, processes per node, where the nodes meet) are easy to get subtly wrong
by hand. Rendering them from the validated config keeps them consistent with
the run (its name, its threads) and refuses a run that cannot be split before
any node is booked.

Pure: strings from a config and a node count; nothing is read, written or
started here (``cli/launch.py`` does the I/O), so every flag is tested without
a process. Paths and overrides are shell-quoted; the values a node knows only
at run time (its rank, the first node's address, the job id) stay shell
variables the node's shell expands.

Two launchers:

- ``torchrun`` with a c10d rendezvous (the default): every node runs the same
  command; the nodes meet at ``--rdzv_endpoint`` and the rendezvous numbers
  them, so no node rank is passed (torchrun ignores ``--node_rank`` for c10d).
  Global rank 0 (the process that writes the run folder) is on whichever node
  the rendezvous numbers first: ``train.output_dir`` must be on a file system
  every node sees.
- ``accelerate launch --config_file FILE`` when an accelerate config is given
  (mixed precision, FSDP, DeepSpeed settings live there): its static
  rendezvous needs each node's ``--machine_rank``.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tunesmith.config.root import Config
from tunesmith.config.specs import TASK_SPECS
from tunesmith.errors import ConfigError

#: torchrun's and accelerate's default rendezvous port.
DEFAULT_PORT = 29500
#: Where a plain command expects node 0's address, and SLURM's script puts it.
ADDRESS_VAR = "MASTER_ADDR"
#: Where a plain accelerate command expects the node's rank (0 .. nodes - 1).
NODE_RANK_VAR = "NODE_RANK"
#: SLURM's own variables: the node's index within the job, and the job's id.
SLURM_NODE_VAR = "SLURM_NODEID"
SLURM_JOB_VAR = "SLURM_JOB_ID"


class Shell(str):
    """Shell text written as is (``"$NODE_RANK"``): the node's shell expands it."""


def _var(name: str, suffix: str = "") -> Shell:
    """``"$NAME<suffix>"``: a variable, double-quoted so a value with spaces stays one word."""
    return Shell(f'"${name}{suffix}"')


def shell_join(words: Sequence[str]) -> str:
    """One command line: literal words shell-quoted, ``Shell`` words kept as written."""
    return " ".join(w if isinstance(w, Shell) else shlex.quote(w) for w in words)


@dataclass(frozen=True)
class Launch:
    """One run on several nodes: what each node starts and where the nodes meet.

    Built by ``plan`` from a validated config; ``main_address`` None leaves node
    0's address to ``$MASTER_ADDR`` on each node (the SLURM script sets it).
    """

    config: str
    nodes: int
    processes_per_node: int = 1
    main_address: str | None = None
    port: int = DEFAULT_PORT
    accelerate_config: str | None = None
    overrides: tuple[str, ...] = ()
    #: The run's name: rendezvous id of a plain command, SLURM job and log name.
    name: str = "tunesmith"
    #: ``train.num_threads``: each process's CPU threads (None: not set).
    threads: int | None = None
    progress: bool = True

    @property
    def processes(self) -> int:
        """Processes of the whole run (the world size)."""
        return self.nodes * self.processes_per_node


def plan(
    cfg: Config,
    config: str | Path,
    nodes: int,
    processes_per_node: int = 1,
    *,
    overrides: Sequence[str] = (),
    main_address: str | None = None,
    port: int = DEFAULT_PORT,
    accelerate_config: str | Path | None = None,
    progress: bool = True,
) -> Launch:
    """The launch of ``cfg`` (read from ``config`` with ``overrides``) on ``nodes`` nodes.

    Raises:
        ConfigError: Every reason the run cannot start that way, one line each.
    """
    check_launchable(cfg, nodes, processes_per_node, port)
    return Launch(
        config=str(config),
        nodes=nodes,
        processes_per_node=processes_per_node,
        main_address=main_address,
        port=port,
        accelerate_config=None if accelerate_config is None else str(accelerate_config),
        overrides=tuple(overrides),
        name=run_name(cfg),
        threads=cfg.train.num_threads,
        progress=progress,
    )


def check_launchable(cfg: Config, nodes: int, processes_per_node: int, port: int) -> None:
    """Refuse the counts and the settings that cannot run on that many processes.

    Raises:
        ConfigError: Every problem at once, a line each naming the setting.
    """
    problems = []
    if nodes < 1:
        problems.append(f"--nodes: {nodes} is not a node count (1 or more)")
    if processes_per_node < 1:
        problems.append(f"--processes-per-node: {processes_per_node} is not 1 or more")
    if not 0 < port < 65536:
        problems.append(f"--port: {port} is not a TCP port (1-65535)")
    if nodes * processes_per_node > 1 and TASK_SPECS.get(cfg.task.type).online:
        problems.append(
            f"task.type: {cfg.task.type} runs in one process (its rollouts are not shared "
            "between processes); launch it with one node and one process"
        )
    if problems:
        raise ConfigError("\n".join(problems))


def check_accelerate_config(settings: Mapping[str, object], source: str) -> None:
    """Refuse an accelerate config that would not join the nodes into one run.

    On CPUs ``accelerate launch`` starts a single process per machine and leaves
    joining them to MPI (``mpirun``): each node would train alone, all writing one
    run folder. torchrun (no ``--accelerate-config``) joins CPU nodes itself.

    Raises:
        ConfigError: The config trains on CPUs.
    """
    if settings.get("use_cpu") or settings.get("distributed_type") == "MULTI_CPU":
        raise ConfigError(
            f"--accelerate-config: {source} trains on CPUs, where accelerate launch does not "
            "join the nodes (it leaves that to mpirun); leave --accelerate-config out to "
            "launch with torchrun"
        )


def run_name(cfg: Config) -> str:
    """The run folder's name, cut to what a SLURM job name and a rendezvous id accept."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(cfg.train.output_dir).name).strip("-.")
    return name or "tunesmith"


def node_command(launch: Launch, node_rank: Shell | None = None, run_id: str | None = None) -> str:
    """The command every node runs (the same line on each; the shell fills in the node).

    Args:
        launch: The run and its nodes.
        node_rank: Shell text of the node's rank (accelerate only): ``"$NODE_RANK"``
            unless given (SLURM: ``"$SLURM_NODEID"``).
        run_id: The rendezvous id, the same on every node and unlike that of any run
            meeting at the same endpoint meanwhile (torchrun only): the run's name
            unless given (SLURM: the job id).
    """
    if launch.accelerate_config is None:
        words = _torchrun(launch, run_id or launch.name)
    else:
        words = _accelerate(launch, launch.accelerate_config, node_rank or _var(NODE_RANK_VAR))
    return shell_join([*words, *_train(launch)])


def _address(launch: Launch, suffix: str = "") -> str:
    if launch.main_address is None:
        return _var(ADDRESS_VAR, suffix)
    return launch.main_address + suffix


def _torchrun(launch: Launch, run_id: str) -> list[str]:
    return [
        "torchrun",
        "--nnodes",
        str(launch.nodes),
        "--nproc_per_node",
        str(launch.processes_per_node),
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        _address(launch, f":{launch.port}"),
        "--rdzv_id",
        run_id,
    ]


def _accelerate(launch: Launch, config_file: str, node_rank: Shell) -> list[str]:
    return [
        "accelerate",
        "launch",
        "--config_file",
        config_file,
        "--num_machines",
        str(launch.nodes),
        "--num_processes",
        str(launch.processes),
        "--machine_rank",
        node_rank,
        "--main_process_ip",
        _address(launch),
        "--main_process_port",
        str(launch.port),
    ]


def _train(launch: Launch) -> list[str]:
    """``-m tunesmith train CONFIG [overrides]``: what each launched process runs."""
    progress = [] if launch.progress else ["--no-progress"]
    return ["-m", "tunesmith", "train", launch.config, *launch.overrides, *progress]


def slurm_script(launch: Launch) -> str:
    """An sbatch script running ``launch``: one launcher per node, meeting on the first node.

    Raises:
        ConfigError: ``main_address`` is set (the job's first node is the main one).
    """
    if launch.main_address is not None:
        raise ConfigError(
            "--main-address: a SLURM job meets on its first node; leave the address out"
        )
    k = launch.processes_per_node
    if launch.threads is None:  # a disabled directive (two #) until the user sets it
        cpus = [f"# CPUS: {k} x the threads of one process", "##SBATCH --cpus-per-task=CPUS"]
    else:
        cpus = [f"#SBATCH --cpus-per-task={k * launch.threads}"]
    if launch.accelerate_config is None:  # the same line on every node: the batch shell expands it
        command = node_command(launch, run_id=_var(SLURM_JOB_VAR))
    else:  # each node's own rank: its own shell expands it
        command = shell_join(["bash", "-c", node_command(launch, _var(SLURM_NODE_VAR))])
    # sbatch reads directives up to the first command; comments go on lines of their own.
    lines = [
        "#!/bin/bash",
        f"# tunesmith run {launch.name}: {launch.nodes} nodes x {k} processes per node,",
        "# rendered by `tunesmith launch --slurm`. One launcher per node (ntasks-per-node=1)",
        "# starts the node's processes; the log lies outside train.output_dir (the run",
        "# replaces that folder). On GPU nodes enable --gpus-per-node (one GPU per process).",
        f"#SBATCH --job-name={launch.name}",
        f"#SBATCH --nodes={launch.nodes}",
        "#SBATCH --ntasks-per-node=1",
        *cpus,
        f"##SBATCH --gpus-per-node={k}",
        f"#SBATCH --output={launch.name}-%j.log",
        "",
        "set -euo pipefail",
        "# The nodes meet on the job's first node.",
        f'export {ADDRESS_VAR}="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f"export OMP_NUM_THREADS={launch.threads or 1}",
        "",
        f"srun --kill-on-bad-exit=1 {command}",
    ]
    return "\n".join(lines) + "\n"
