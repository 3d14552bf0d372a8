"""The export command: copies, merged models, int8 and ONNX deployments.

Kept apart from ``cli.py`` (which it registers on) so the command-line module
stays one screenful per concern; the error handling is ``cli.main``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunesmith.cli import app


@app.command("export")
def export_(
    checkpoint: Annotated[Path, typer.Argument(help="A best/ or final/ folder.")],
    output: Annotated[Path, typer.Argument(help="New folder to write.")],
    merge: Annotated[
        bool, typer.Option("--merge", help="Fold LoRA/DoRA/IA3 into the base weights.")
    ] = False,
    quantize: Annotated[
        str | None, typer.Option(help="int8: dynamic int8 Linear layers and int8 embeddings.")
    ] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="onnx: an ONNX graph checked by onnxruntime.")
    ] = None,
    data: Annotated[str | None, typer.Option(help="Data file the export is measured on.")] = None,
    split: Annotated[
        str | None, typer.Option(help="Split of the run to measure on (default: test).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Served batch size timed.")] = 32,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads while timing (default: as set).")
    ] = None,
) -> None:
    """Export a checkpoint; --merge gives a plain transformers model for LoRA/DoRA/IA3.

    --quantize int8 and --format onnx merge adapters first, then print size,
    latency and quality against the checkpoint on the run's test split (or
    --data / --split). Bottleneck adapters, prefix and prompt tuning cannot
    be merged: they export unmerged, and neither int8 nor ONNX takes them.
    """
    from tunesmith.errors import ConfigError

    if quantize is not None and quantize != "int8":
        raise ConfigError(f"export: unknown --quantize '{quantize}'; use int8")
    if fmt is not None and fmt != "onnx":
        raise ConfigError(f"export: unknown --format '{fmt}'; use onnx")
    if quantize and fmt:
        raise ConfigError("export: give --quantize int8 or --format onnx, not both")
    if quantize or fmt:
        from tunesmith.deploy.reports import int8_export_report, onnx_export_report
        from tunesmith.evaluate.evaluator import EvalOptions

        report = int8_export_report if quantize else onnx_export_report
        opts = EvalOptions(batch_size=batch_size, threads=threads)
        typer.echo(report(checkpoint, output, data=data, split=split, options=opts))
        return
    from tunesmith.export import export

    typer.echo(f"exported to {export(checkpoint, output, merge=merge)}")
