"""The export and prune commands: copies, merged models, int8, ONNX, GGUF, pruned models.

Kept apart from ``cli.py`` (which it registers on) so the command-line module
stays one screenful per concern; the error handling is ``cli.main``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer()

#: The options saying what an exported or pruned model is measured on, and how.
MeasureData = Annotated[str | None, typer.Option("--data", help="Data file to measure on.")]
MeasureSplit = Annotated[
    str | None, typer.Option("--split", help="Split of the run to measure on (default: test).")
]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Served batch size timed.")]
Threads = Annotated[
    int | None,
    typer.Option("--threads", min=1, help="CPU threads while timing (default: as set)."),
]


@app.command("export")
def export_(
    checkpoint: Annotated[Path, typer.Argument(help="A best/ or final/ folder.")],
    output: Annotated[Path, typer.Argument(help="New folder to write.")],
    merge: Annotated[
        bool, typer.Option("--merge", help="Fold LoRA/DoRA/IA3 into the base weights.")
    ] = False,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="int8: dynamic int8 Linear layers and int8 embeddings. With --format gguf: "
            "f32, f16 (default) or q8_0."
        ),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="onnx: an ONNX graph checked by onnxruntime. gguf: one GGUF file for "
            "llama.cpp/Ollama (causal LMs), checked by transformers and llama.cpp.",
        ),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="GGUF: check the file before writing it.")
    ] = True,
    check_prompts: Annotated[
        int,
        typer.Option(min=0, help="GGUF: validation chats checked on (plus 4 fixed prompts)."),
    ] = 16,
    data: MeasureData = None,
    split: MeasureSplit = None,
    batch_size: BatchSize = 32,
    threads: Threads = None,
) -> None:
    """Export a checkpoint; --merge gives a plain transformers model for LoRA/DoRA/IA3.

    --quantize int8 and --format onnx merge adapters first, then print size,
    latency and quality against the checkpoint on the run's test split (or
    --data / --split). --format gguf merges adapters and writes one GGUF file
    with an Ollama Modelfile, after checking it with transformers' GGUF
    reader and (when llama-cpp-python is installed) llama.cpp. Bottleneck
    adapters, prefix and prompt tuning cannot be merged: they export
    unmerged, and none of int8, ONNX or GGUF takes them.
    """
    from tunesmith.deploy.formats import ExportRequest, export_format
    from tunesmith.evaluation.evaluator import EvalOptions

    chosen = export_format(fmt, quantize)
    if chosen is not None:
        request = ExportRequest(
            quantize=quantize,
            data=data,
            split=split,
            options=EvalOptions(batch_size=batch_size, threads=threads),
            check=check,
            check_prompts=check_prompts,
        )
        typer.echo(chosen.run(checkpoint, output, request))
        return
    from tunesmith.deploy.export import export

    typer.echo(f"exported to {export(checkpoint, output, merge=merge)}")


@app.command("prune")
def prune_(
    checkpoint: Annotated[Path, typer.Argument(help="A best/ or final/ folder.")],
    output: Annotated[Path, typer.Argument(help="New folder to write.")],
    sparsity: Annotated[
        float, typer.Option(help="Share to remove: of the weights (magnitude) or heads/neurons.")
    ],
    kind: Annotated[
        str, typer.Option(help="magnitude (zero weights), heads or neurons (remove them).")
    ] = "magnitude",
    scope: Annotated[
        str, typer.Option(help="global: rank across layers; per_layer: same share in each.")
    ] = "global",
    rounds: Annotated[int, typer.Option(help="Rounds reaching --sparsity gradually.")] = 1,
    recover_steps: Annotated[
        int, typer.Option(help="Fine-tuning steps on the run's training rows after each round.")
    ] = 0,
    importance: Annotated[
        str, typer.Option(help="Heads/neurons: magnitude, or gradient on training batches.")
    ] = "magnitude",
    train_data: Annotated[
        str | None, typer.Option(help="Recover on this file instead of the run's training rows.")
    ] = None,
    data: MeasureData = None,
    split: MeasureSplit = None,
    batch_size: BatchSize = 32,
    threads: Threads = None,
) -> None:
    """Prune a checkpoint, optionally in rounds with recovery fine-tuning; print what it bought.

    magnitude zeros the smallest encoder Linear weights (same size and, on CPU,
    usually the same speed: the table shows it); heads and neurons remove whole
    attention heads or FFN neurons of BERT-like encoders (smaller and faster).
    Adapters (LoRA/DoRA/IA3) are merged first. Prints requested and achieved
    sparsity, parameters, size, latency and the metric before and after, on the
    run's test split (or --data / --split).
    """
    from tunesmith.deploy.prune_report import prune_report
    from tunesmith.deploy.prune_run import PruneSettings
    from tunesmith.evaluation.evaluator import EvalOptions

    settings = PruneSettings(
        kind=kind,
        sparsity=sparsity,
        scope=scope,
        rounds=rounds,
        recover_steps=recover_steps,
        importance=importance,
        train_data=train_data,
    )
    settings.check()  # before any loading
    opts = EvalOptions(batch_size=batch_size, threads=threads)
    report = prune_report(
        checkpoint, output, settings, data=data, split=split, options=opts, progress=True
    )
    typer.echo(report)
