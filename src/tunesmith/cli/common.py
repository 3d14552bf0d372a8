"""Argument types and output formatting shared by the command modules."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

Library = Annotated[Path, typer.Option("--library", help="Adapter library folder.")]

Overrides = Annotated[
    list[str] | None, typer.Argument(help="Dotted overrides, e.g. optim.lr=3e-5 train.epochs=2")
]

NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")]

TrustRemoteCode = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run the checkpoint's own model code (never taken from the checkpoint itself).",
    ),
]

AllowUnsafeWeights = Annotated[
    bool,
    typer.Option(
        "--allow-unsafe-weights", help="Accept pickle weights (loaded with weights_only=True)."
    ),
]


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _rate(text: str) -> float:
    from tunesmith.errors import ConfigError

    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--strengths: {text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise ConfigError(f"--strengths: {value} is not a share of words in [0, 1]")
    return value


# -- output -----------------------------------------------------------------
def _report(result: Any) -> None:
    loop = result.loop
    lines = [
        f"steps: {loop.steps} ({loop.epochs:.2f} epochs) in {loop.train_seconds:.0f} s, "
        f"{loop.tokens_per_s:.0f} real tokens/s, peak memory {loop.peak_rss_mb:.0f} MiB"
        + (" (stopped early)" if loop.stopped_early else ""),
    ]
    if result.validation_metrics:
        lines.append(
            f"best validation (step {loop.best_step}): "
            + _metrics_text(result.validation_metrics, compact=True)
        )
    if result.test_metrics:
        lines.append("test (held out, best checkpoint):\n" + _metrics_text(result.test_metrics))
    lines.append(f"best model: {result.best_dir or result.final_dir}")
    typer.echo("\n".join(lines))


#: Prefixes of per-class report keys (``f1/<label>``), shown as a table, not as lines.
_PER_CLASS = ("precision", "recall", "f1", "support")


def _metrics_text(metrics: dict[str, Any], compact: bool = False) -> str:
    # Plain metrics, and a multi-task run's ``<task>/<metric>`` (not its per-class keys).
    top = {
        k: v
        for k, v in metrics.items()
        if "/" not in k or (k.count("/") == 1 and k.split("/")[0] not in _PER_CLASS)
    }
    if compact:
        return ", ".join(f"{k}={_fmt(v)}" for k, v in top.items())
    width = max((len(k) for k in top), default=0) + 2
    lines = [f"{k:<{width}}{_fmt(v)}" for k, v in top.items()]
    per_class = sorted({k.split("/", 1)[1] for k in metrics if k.startswith("f1/")})
    if per_class:
        w = max(16, *(len(lab) + 2 for lab in per_class))
        lines.append(f"{'label':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
        for lab in per_class:
            lines.append(
                f"{lab:<{w}}{metrics[f'precision/{lab}']:>10.4f}{metrics[f'recall/{lab}']:>10.4f}"
                f"{metrics[f'f1/{lab}']:>10.4f}{metrics[f'support/{lab}']:>9}"
            )
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
