"""``tunesmith launch``: the commands that run one config on several nodes.

Prints (or writes) what to start: the launcher line every node runs, or with
``--slurm`` a whole sbatch script. Nothing is started here, so the line can be
read, edited and pasted into any scheduler. The config is validated first, so
a bad one fails now, not on every node after the job waited in the queue.
Imports of the package's layers are deferred into the command, like the other
command modules, so ``tunesmith --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml

from tunesmith.cli.common import Overrides
from tunesmith.errors import ConfigError

app = typer.Typer()


@app.command()
def launch(
    config: Annotated[
        Path, typer.Argument(help="YAML config file, at this same path on every node.")
    ],
    nodes: Annotated[int, typer.Option("--nodes", min=1, help="Machines of the run.")],
    overrides: Overrides = None,
    processes_per_node: Annotated[
        int, typer.Option(min=1, help="Processes each node starts (one per GPU).")
    ] = 1,
    main_address: Annotated[
        str | None,
        typer.Option(
            help="Host or IP of node 0, where the nodes meet (default: $MASTER_ADDR on each "
            "node; a SLURM job uses its first node).",
            metavar="HOST",
        ),
    ] = None,
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="Rendezvous port on node 0 (free on it).")
    ] = 29500,
    accelerate_config: Annotated[
        Path | None,
        typer.Option(
            help="Start with `accelerate launch --config_file FILE` instead of torchrun "
            "(precision, FSDP or DeepSpeed settings); needs each node's rank in $NODE_RANK. "
            "GPU nodes only: on CPUs accelerate does not join the machines.",
            metavar="FILE",
        ),
    ] = None,
    slurm: Annotated[
        bool, typer.Option("--slurm", help="Render an sbatch script instead of one command.")
    ] = False,
    output: Annotated[
        Path | None, typer.Option(help="Write to FILE instead of printing.", metavar="FILE")
    ] = None,
) -> None:
    """Render the command that trains CONFIG on NODES machines (or a SLURM batch script).

    Every node runs the printed line: torchrun with a c10d rendezvous at
    --main-address:--port, which numbers the nodes itself; each process then
    runs `tunesmith train CONFIG`. The weights equal one process trained on the
    same global batch (train.batch_size per process x all processes), so halve
    train.batch_size when doubling the processes. Data, model and the config must
    sit at the same paths on every node, and train.output_dir on a file system
    they all see (the process of global rank 0 writes it).
    """
    from tunesmith.config.root import Config
    from tunesmith.runs.launch import check_accelerate_config, node_command, plan, slurm_script

    cfg = Config.load(config, overrides or [])
    if accelerate_config is not None:
        check_accelerate_config(_read_settings(accelerate_config), str(accelerate_config))
    run = plan(
        cfg,
        config,
        nodes,
        processes_per_node,
        overrides=overrides or [],
        main_address=main_address,
        port=port,
        accelerate_config=accelerate_config,
        progress=not slurm,  # a job's log is no terminal: no progress bars in it
    )
    text = slurm_script(run) if slurm else node_command(run) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {output}", err=True)
    if slurm:
        typer.echo(f"submit with: sbatch {output or 'SCRIPT'}", err=True)
        return
    if main_address is None:
        typer.echo("on every node, set MASTER_ADDR to node 0's address first", err=True)
    if accelerate_config is not None:
        typer.echo(f"on every node, set NODE_RANK (0 to {nodes - 1}) first", err=True)


def _read_settings(path: Path) -> dict:
    """An accelerate config file's settings (YAML or JSON, as accelerate writes them).

    Raises:
        ConfigError: The file is missing or not a mapping.
    """
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--accelerate-config: cannot read {path}: {err}") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"--accelerate-config: {path} is not a mapping of settings")
    return settings
