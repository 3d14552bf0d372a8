"""The trainable-parameter table printed at the start of every run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from tunesmith.methods.base import ParamGroup


def parameter_table(
    model: nn.Module, groups: Sequence[ParamGroup], base_lr: float
) -> list[dict[str, Any]]:
    """Per group: trainable parameter count, share of the model and learning rate.

    The last row is the total; the numbers are exact counts of elements, so
    they double as a check that the method froze what it claimed to.
    """
    total = sum(p.numel() for p in model.parameters())
    rows = []
    for g in groups:
        n = sum(p.numel() for _, p in g.params)
        rows.append(
            {
                "group": g.name,
                "tensors": len(g.params),
                "trainable": n,
                "percent": 100.0 * n / total if total else 0.0,
                "lr": base_lr * g.lr_multiplier,
            }
        )
    trainable = sum(r["trainable"] for r in rows)
    rows.append(
        {
            "group": "total",
            "tensors": sum(r["tensors"] for r in rows),
            "trainable": trainable,
            "percent": 100.0 * trainable / total if total else 0.0,
            "lr": None,
            "parameters": total,
        }
    )
    return rows


def format_parameter_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text rendering (logs and terminals alike)."""
    total = rows[-1].get("parameters", 0)
    lines = [f"{'group':<24}{'tensors':>8}{'trainable':>14}{'%':>9}{'lr':>11}"]
    for r in rows:
        lr = f"{r['lr']:.2e}" if r["lr"] is not None else ""
        lines.append(
            f"{r['group']:<24}{r['tensors']:>8}{r['trainable']:>14,}{r['percent']:>8.2f}%{lr:>11}"
        )
    lines.append(f"model parameters: {total:,}")
    return "\n".join(lines)
