"""``tunesmith adapters ...``: the library of per-task adapters on one base."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunesmith.cli.common import (
    Library,
)

app = typer.Typer()
adapters_app = typer.Typer(
    no_args_is_help=True, help="A library of per-task adapters sharing one base model."
)
app.add_typer(adapters_app, name="adapters")


@adapters_app.command("add")
def adapters_add(
    name: Annotated[str, typer.Argument(help="Name to predict with.")],
    checkpoint: Annotated[Path, typer.Argument(help="An adapter run's best/ or final/.")],
    library: Library = Path("adapters"),
) -> None:
    """Copy an adapter checkpoint into the library (same base model as the others)."""
    from tunesmith.runs.library import AdapterLibrary

    typer.echo(f"added {name}: {AdapterLibrary(library).add(name, checkpoint)}")


@adapters_app.command("list")
def adapters_list(library: Library = Path("adapters")) -> None:
    """The adapters in the library, with method, task, size and labels."""
    from tunesmith.runs.library import AdapterLibrary, describe

    typer.echo(describe(AdapterLibrary(library).info()))


@adapters_app.command("delete")
def adapters_delete(
    name: Annotated[str, typer.Argument(help="Adapter to remove.")],
    library: Library = Path("adapters"),
) -> None:
    """Remove an adapter from the library."""
    from tunesmith.runs.library import AdapterLibrary

    AdapterLibrary(library).delete(name)
    typer.echo(f"deleted {name}")
