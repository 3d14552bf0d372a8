"""What ``tunesmith export --quantize int8`` and ``--format onnx`` print after writing.

Why measure at export time: a deployment format is chosen for its size, speed
and faithfulness, and the numbers that decide are the ones on the user's own
model and data, side by side with the checkpoint it came from. Both reports
are written as JSON next to the exported files (``export_report.json``) too.

The data measured on is a data file or a split of the checkpoint's run; by
default the run's test split (or its validation split) as ``splits.json``
next to the checkpoint lists it, and otherwise nothing is measured (the
export itself is still checked: the ONNX graph passes its parity check).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.core.tables import text_table
from tunesmith.deploy.compare import compare_checkpoints, format_comparison
from tunesmith.deploy.int8_export import export_int8
from tunesmith.deploy.onnx_export import DEFAULT_OPSET, export_onnx, onnx_latency
from tunesmith.evaluation.evaluator import EvalOptions
from tunesmith.runs.load import records_for

REPORT_FILE = "export_report.json"


def default_split(checkpoint: str | Path, data: str | None, split: str | None) -> str | None:
    """The split to measure on: the one given, else the run's test split, else its validation.

    None when a data file is given or the run recorded no held-out rows.
    """
    if data is not None or split is not None:
        return split
    path = Path(checkpoint).resolve().parent / "splits.json"
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return next((name for name in ("test", "validation") if rows.get(name)), None)


def int8_export_report(
    checkpoint: str | Path,
    output: str | Path,
    *,
    data: str | None = None,
    split: str | None = None,
    options: EvalOptions | None = None,
) -> str:
    """Export ``checkpoint`` as int8 to ``output``; the before/after table, or why there is none."""
    folder = export_int8(checkpoint, output)
    split = default_split(checkpoint, data, split)
    lines = [f"exported int8 model to {folder}"]
    if data is None and split is None:
        return "\n".join([*lines, nothing_measured(checkpoint)])
    comparison = compare_checkpoints(checkpoint, folder, data, split=split, options=options)
    write_report(folder, {"kind": "int8", **comparison.as_dict()})
    return "\n".join([*lines, format_comparison(comparison)])


def onnx_export_report(
    checkpoint: str | Path,
    output: str | Path,
    *,
    data: str | None = None,
    split: str | None = None,
    options: EvalOptions | None = None,
    opset: int | None = None,
) -> str:
    """Export ``checkpoint`` to ONNX in ``output``; parity, and latency of both runtimes."""

    done = export_onnx(checkpoint, output, opset=opset or DEFAULT_OPSET)
    lines = [f"exported ONNX graph to {done.model_file} (opset {done.opset})"]
    if done.parity is not None:
        shapes = ", ".join(f"{c['batch']}x{c['length']}" for c in done.parity.cases)
        lines.append(
            f"parity with PyTorch on random inputs ({shapes}): max |difference| "
            f"{done.parity.max_abs_diff:.2e} <= {done.parity.atol:g}"
        )
    split = default_split(checkpoint, data, split)
    if data is None and split is None:
        return "\n".join([*lines, nothing_measured(checkpoint)])
    opts = options or EvalOptions()
    served = done.served  # the exported model: timed without loading the checkpoint again
    records = records_for(served.task, served.cfg, checkpoint, data, split)
    timed = onnx_latency(
        served,
        done.model_file,
        records=records,
        batch_size=opts.batch_size,
        batches=opts.latency_batches,
        warmup=opts.warmup,
        threads=opts.threads,
    )
    where = data if data is not None else f"{split} split"
    write_report(
        done.folder, {"kind": "onnx", "data": where, "parity": done.info["parity"], **timed}
    )
    lines.append(f"latency on {where} ({len(records)} examples, {timed['threads']} CPU threads):")
    lines.append(latency_table(timed))
    return "\n".join(lines)


def latency_table(timed: dict[str, Any]) -> str:
    """PyTorch against onnxruntime: p50 latency at batch 1, throughput at the served batch."""
    bs1, big = timed["latency_bs1"], timed["throughput"]
    size = big["pytorch"]["batch_size"]
    speedup = big["onnxruntime"]["examples_per_s"] / big["pytorch"]["examples_per_s"]
    rows = [
        [
            "latency batch 1, p50 (ms)",
            f"{bs1['pytorch']['p50_ms']:.2f}",
            f"{bs1['onnxruntime']['p50_ms']:.2f}",
            f"{bs1['pytorch']['p50_ms'] / bs1['onnxruntime']['p50_ms']:.2f}x faster",
        ],
        [
            f"throughput batch {size} (examples/s)",
            f"{big['pytorch']['examples_per_s']:.1f}",
            f"{big['onnxruntime']['examples_per_s']:.1f}",
            f"{speedup:.2f}x faster",
        ],
    ]
    return text_table(["", "pytorch", "onnxruntime", "change"], rows)


def nothing_measured(checkpoint: str | Path) -> str:
    """Why an export or pruning run printed no speed or quality numbers."""
    return (
        f"nothing measured: no held-out split recorded next to {checkpoint}; "
        "give --data FILE to compare size, latency and quality"
    )


def write_report(folder: Path, report: dict[str, Any], name: str = REPORT_FILE) -> None:
    """The printed numbers as JSON next to the exported files."""
    (Path(folder) / name).write_text(
        json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8"
    )
