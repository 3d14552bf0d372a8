"""``tunesmith assets prepare``: locate and convert the offline demo assets."""

from __future__ import annotations

import typer

app = typer.Typer()
assets_app = typer.Typer(no_args_is_help=True, help="The offline demo models and data.")
app.add_typer(assets_app, name="assets")


@assets_app.command("prepare")
def assets_prepare() -> None:
    """Locate every offline asset and convert those that need it (once; cached)."""
    from tunesmith.assets.locate import ASSETS, find, locate

    for name, asset in ASSETS.items():
        if find(asset) is None:
            typer.echo(f"{name}: missing ({asset.install_command})")
            continue
        typer.echo(f"{name}: {locate(asset)}")
