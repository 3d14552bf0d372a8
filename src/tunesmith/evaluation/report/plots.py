"""The run report's plots, drawn from ``metrics.jsonl`` with matplotlib (no display needed).

Each plot is a PNG in ``RUN_DIR/plots/``; a plot whose data the run did not
log (no validation, no learning-rate groups) is left out rather than drawn
empty, and the page says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Parts of validation keys that mark per-class details, not curves worth a line each.
_DETAILS = {"precision", "recall", "f1", "support", "forgetting"}
#: Keys of a metrics record that are bookkeeping, not metrics.
_BOOKKEEPING = {"step", "epoch", "split", "time", "checkpoint"}


def series(
    records: Sequence[Mapping[str, Any]], split: str, keep: Callable[[str], bool]
) -> dict[str, tuple[list[float], list[float]]]:
    """Per metric key chosen by ``keep``: (steps, values) of the ``split`` records."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for record in records:
        if record.get("split") != split:
            continue
        for key, value in record.items():
            if key in _BOOKKEEPING or not isinstance(value, int | float) or not keep(key):
                continue
            steps, values = out.setdefault(key, ([], []))
            steps.append(float(record.get("step", 0)))
            values.append(float(value))
    return out


def is_curve_metric(key: str) -> bool:
    """Validation metrics drawn as curves: headline ones, not per-class details or losses.

    Per-class keys look like ``precision/fresh`` (multi-task: ``ner/precision/person``).
    """
    parts = key.split("/")
    return not any(p in _DETAILS for p in parts) and not any("loss" in p for p in parts)


def _plot(
    path: Path,
    title: str,
    lines: Mapping[str, tuple[list[float], list[float]]],
    ylabel: str,
    *,
    log_y: bool = False,
    markers: Sequence[str] = (),
) -> Path | None:
    """One figure of ``lines`` (label -> (x, y)); None when there is nothing to draw."""
    lines = {k: v for k, v in lines.items() if v[0]}
    if not lines:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    try:
        for label, (x, y) in lines.items():
            style = "o-" if label in markers or len(x) < 3 else "-"
            ax.plot(x, y, style, label=label, markersize=4, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        if log_y and all(v > 0 for _, ys in lines.values() for v in ys):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7, ncol=2 if len(lines) > 6 else 1)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def draw_all(records: Sequence[Mapping[str, Any]], folder: Path) -> dict[str, Path | None]:
    """Every plot of the report into ``folder``: name -> PNG path, or None when not logged."""
    train_loss = series(records, "train", lambda k: k == "loss" or k.startswith("loss/"))
    val_loss = series(records, "validation", lambda k: k == "loss")
    losses = {f"train {k}": v for k, v in train_loss.items()}
    losses |= {f"validation {k}": v for k, v in val_loss.items()}
    validation = [f"validation {k}" for k in val_loss]
    plots = {
        "loss": _plot(folder / "loss.png", "Loss", losses, "loss", markers=validation),
        "metrics": _plot(
            folder / "metrics.png",
            "Validation metrics",
            series(records, "validation", is_curve_metric),
            "value",
            markers=list(series(records, "validation", is_curve_metric)),
        ),
        "lr": _plot(
            folder / "lr.png",
            "Learning rate per group",
            _strip(series(records, "train", lambda k: k.startswith("lr/")), "lr/"),
            "learning rate",
        ),
        "grad_norms": _plot(
            folder / "grad_norms.png",
            "Gradient norm per group",
            _strip(series(records, "train", lambda k: k.startswith("grad_norm")), "grad_norm/"),
            "L2 norm",
            log_y=True,
        ),
        "throughput": _plot(
            folder / "throughput.png",
            "Training throughput",
            series(records, "train", lambda k: k == "tokens_per_s"),
            "real tokens / s",
        ),
        "memory": _plot(
            folder / "memory.png",
            "Resident memory",
            series(records, "train", lambda k: k == "rss_mb"),
            "MiB",
        ),
    }
    # Preference runs only: the implicit rewards of chosen and rejected replies, their margin.
    rewards = _strip(series(records, "train", lambda k: k.startswith("rewards/")), "rewards/")
    if rewards:
        plots["rewards"] = _plot(folder / "rewards.png", "Preference rewards", rewards, "mean")
    # RL runs only: the rollouts' mean reward and KL to the reference.
    online = series(records, "train", lambda k: k in ("reward", "kl"))
    if online:
        plots["rl"] = _plot(folder / "rl.png", "Rollout reward and KL", online, "mean")
    return plots


def _strip(
    lines: Mapping[str, tuple[list[float], list[float]]], prefix: str
) -> dict[str, tuple[list[float], list[float]]]:
    return {
        (k.removeprefix(prefix) if k.startswith(prefix) else "total"): v for k, v in lines.items()
    }
