"""What ``tunesmith prune`` prints: requested against achieved sparsity, and what it bought.

Why report all of it: sparsity is only worth its cost in accuracy if it buys
size or speed, and unstructured sparsity usually buys neither on a CPU (dense
kernels multiply zeros as fast as any number, and the zeros are stored like
any number). Printing parameter counts, size on disk, latency and the metric
side by side — measured, never assumed — lets the numbers say so. Speed and
quality come from ``deploy.compare`` (models timed turn by turn on the same
batches); the report is written as JSON into the pruned folder too
(``prune_report.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.core.tables import text_table
from tunesmith.deploy.compare import Comparison, compare_checkpoints, comparison_rows
from tunesmith.deploy.prune_run import PruneResult, PruneSettings, prune_checkpoint
from tunesmith.deploy.reports import default_split, nothing_measured, write_report
from tunesmith.evaluation.evaluator import EvalOptions, checkpoint_size

REPORT_FILE = "prune_report.json"
_WHAT = {
    "magnitude": "sparsity of the encoder Linear weights",
    "heads": "attention heads removed",
    "neurons": "FFN neurons removed",
}


def prune_report(
    checkpoint: str | Path,
    output: str | Path,
    settings: PruneSettings,
    *,
    data: str | None = None,
    split: str | None = None,
    options: EvalOptions | None = None,
    progress: bool = False,
) -> str:
    """Prune ``checkpoint`` into ``output``; the before/after table (and why parts are missing)."""
    result = prune_checkpoint(checkpoint, output, settings, progress=progress)
    split = default_split(checkpoint, data, split)
    lines = [f"pruned model written to {result.folder}", describe(result)]
    comparison = None
    if data is None and split is None:
        lines.append(nothing_measured(checkpoint))
    else:
        comparison = compare_checkpoints(
            checkpoint, result.folder, data, split=split, options=options
        )
        lines.append(
            f"measured on {comparison.data} ({comparison.examples} examples, "
            f"{comparison.threads} CPU threads)"
        )
    lines.append(format_prune_table(result, comparison))
    report = {"kind": "prune", **result.as_dict()}
    if comparison is not None:
        report["comparison"] = comparison.as_dict()
    write_report(result.folder, report, REPORT_FILE)
    return "\n".join(lines)


def describe(result: PruneResult) -> str:
    """One line: what was asked, in how many rounds, with how much recovery."""
    s = result.settings
    how = f"{s.kind} pruning, scope {s.scope}"
    if s.kind != "magnitude":
        how += f", {s.importance} importance"
    targets = ", ".join(f"{r['target']:.3f}" for r in result.rounds)
    rounds = f"{s.rounds} round{'s' if s.rounds > 1 else ''} (targets {targets})"
    recovery = f"{s.recover_steps} recovery steps after each" if s.recover_steps else "no recovery"
    line = f"{how}; {rounds}; {recovery}"
    losses = [r for r in result.rounds if "recovery_loss_last" in r]
    if losses:
        line += (
            f" (training loss {losses[0]['recovery_loss_first']:.4f} -> "
            f"{losses[-1]['recovery_loss_last']:.4f})"
        )
    return line


def format_prune_table(result: PruneResult, comparison: Comparison | None) -> str:
    """Sparsity, parameters and size always; latency, throughput and the metric when measured."""
    b, a = result.before, result.after
    target = result.settings.sparsity
    rows = [
        [
            f"{_WHAT[result.settings.kind]} (requested {target:.2f})",
            f"{b['sparsity']:.4f}",
            f"{a['sparsity']:.4f}",
            f"{100 * (a['sparsity'] - target):+.2f} points vs requested",
        ],
        [
            "zero or removed share of all parameters",
            f"{b['all_sparsity']:.4f}",
            f"{a['all_sparsity']:.4f}",
            "",
        ],
        ["parameters", f"{b['parameters']:,}", f"{a['parameters']:,}", _pct(b, a, "parameters")],
        [
            "non-zero parameters",
            f"{b['nonzero_parameters']:,}",
            f"{a['nonzero_parameters']:,}",
            _pct(b, a, "nonzero_parameters"),
        ],
    ]
    if comparison is None:
        before_mb = checkpoint_size(Path(result.checkpoint))["weights_mb"]
        after_mb = checkpoint_size(result.folder)["weights_mb"]
        rows.append(["weights on disk (MB)", f"{before_mb:.2f}", f"{after_mb:.2f}", ""])
    else:
        rows += comparison_rows(comparison)
    return text_table(["", "before", "after", "change"], rows)


def _pct(before: dict[str, Any], after: dict[str, Any], key: str) -> str:
    return f"{100 * (after[key] - before[key]) / before[key]:+.1f}%"
