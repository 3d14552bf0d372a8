"""The ``tunesmith data`` commands: look at the data a config will train on, before training.

Kept apart from ``cli.py`` (which they register on) so the command-line module
stays one screenful per concern; the error handling is ``cli.main``'s.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from tunesmith.cli.common import Overrides

app = typer.Typer()

data_app = typer.Typer(no_args_is_help=True, help="Look at the data a config will train on.")
app.add_typer(data_app, name="data")

ConfigFile = Annotated[Path, typer.Argument(help="YAML config file.")]
ReportFile = Annotated[Path, typer.Option("--output", help="Where the report is written as JSON.")]


@data_app.command("audit")
def data_audit(
    config: ConfigFile,
    overrides: Overrides = None,
    samples: Annotated[int, typer.Option(min=0, help="Rendered samples to show.")] = 3,
    seed: Annotated[int, typer.Option(help="Which samples.")] = 0,
) -> None:
    """Rendered training samples with the trained tokens marked, and the trained share."""
    from tunesmith.config.root import Config
    from tunesmith.inspect.data_audit import audit, render_audit

    report = audit(Config.load(config, overrides or []), samples, seed)
    typer.echo(render_audit(report, color=sys.stdout.isatty()))


@data_app.command("inspect")
def data_inspect(
    config: ConfigFile,
    overrides: Overrides = None,
    output: ReportFile = Path("data_report.json"),
) -> None:
    """Cleaning (rows dropped by reason, conflicting labels), leakage, labels, truncation."""
    from tunesmith.config.root import Config
    from tunesmith.inspect.data_quality import inspect_data, render, write_json

    report = inspect_data(Config.load(config, overrides or []))
    typer.echo(render(report))
    typer.echo(f"wrote the report as JSON to {write_json(report, output)}", err=True)


@data_app.command("augment")
def data_augment(
    config: ConfigFile,
    overrides: Overrides = None,
    show: Annotated[int, typer.Option(min=0, help="Original examples to show.")] = 10,
    seed: Annotated[int, typer.Option(help="Which examples to show.")] = 0,
) -> None:
    """Preview data.augment: originals with their augmented copies, exactly as train makes them."""
    from tunesmith.config.root import Config
    from tunesmith.inspect.augment_preview import preview

    typer.echo(preview(Config.load(config, overrides or []), show, seed))
