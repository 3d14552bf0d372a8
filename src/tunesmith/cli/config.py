"""``tunesmith config validate|show``: check or print a config without training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunesmith.cli.common import (
    Overrides,
)

app = typer.Typer()
config_app = typer.Typer(no_args_is_help=True, help="Validate or show a config file.")
app.add_typer(config_app, name="config")


@config_app.command("validate")
def config_validate(
    file: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Overrides = None,
) -> None:
    """Check a config file; exit 0 when valid, 2 listing every problem otherwise."""
    from tunesmith.config.root import Config

    Config.load(file, overrides or [])
    typer.echo(f"{file}: valid")


@config_app.command("show")
def config_show(
    file: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Overrides = None,
) -> None:
    """Print the fully resolved config (defaults filled in, overrides applied)."""
    from tunesmith.config.root import Config

    typer.echo(Config.load(file, overrides or []).to_yaml(), nl=False)
