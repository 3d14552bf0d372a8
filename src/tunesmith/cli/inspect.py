"""Inspection commands: ``estimate``, ``analyze`` and ``doctor`` (nothing is trained)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tunesmith.cli.common import (
    Overrides,
)

app = typer.Typer()


@app.command()
def estimate(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Overrides = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps timed after the first.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
    processes: Annotated[
        int, typer.Option(help="Processes (GPUs) of the planned run: adds a per-rank table.")
    ] = 1,
    shard: Annotated[
        str | None,
        typer.Option(help="none | ddp | zero2 | zero3 | fsdp: how model states are split."),
    ] = None,
    offload: Annotated[
        bool,
        typer.Option(
            "--offload", help="Sharded states on the CPU (zero2: optimizer and gradients)."
        ),
    ] = False,
) -> None:
    """Parameters, memory (weights, gradients, optimizer, activations) and time per epoch.

    Builds the run as `train` would and takes a few real steps; writes nothing.
    With --processes/--shard it adds each rank's weights, gradients and optimizer
    state. Exits 1 when the estimate does not fit in the available memory.
    """
    from tunesmith.config.root import Config
    from tunesmith.inspect.estimate import estimate as run_estimate
    from tunesmith.inspect.estimate import format_estimate
    from tunesmith.inspect.sharding import Sharding

    sharding = Sharding.from_options(processes, shard, offload)  # refuses nonsense first
    cfg = Config.load(config, overrides or [])
    result = run_estimate(cfg, timed_steps=steps, sharding=sharding)
    typer.echo(json.dumps(result.as_dict(), indent=1) if as_json else format_estimate(result))
    if not result.fits:
        raise typer.Exit(1)


@app.command()
def analyze(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Overrides = None,
    batches: Annotated[int, typer.Option(min=1, help="Training batches measured.")] = 8,
    probe_steps: Annotated[int, typer.Option(min=1, help="AdamW steps per probe.")] = 10,
) -> None:
    """Per-layer-group gradient norms, Fisher importance and a probe; suggests what to train."""
    from tunesmith.config.root import Config
    from tunesmith.inspect.analyze import analyze as run_analyze
    from tunesmith.inspect.analyze import render

    cfg = Config.load(config, overrides or [])
    typer.echo(render(run_analyze(cfg, batches=batches, probe_steps=probe_steps)))


@app.command()
def doctor() -> None:
    """Versions, threads, bf16 support and whether the offline demo assets are installed."""
    from tunesmith.inspect.doctor import collect, render

    typer.echo(render(collect()))
