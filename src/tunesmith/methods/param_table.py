"""The trainable-parameter table printed at the start of every run (and saved)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from tunesmith.methods.base import ParamGroup


def parameter_table(
    layer_groups: Mapping[str, Sequence[nn.Parameter]],
    groups: Sequence[ParamGroup],
    base_lr: float,
) -> list[dict[str, Any]]:
    """Per layer group: parameters, how many train, their share and learning rate.

    Args:
        layer_groups: Every parameter of the model by layer group (embeddings,
            each block, head), from the method.
        groups: The optimizer groups the method asked for (what trains, at
            which multiplier).
        base_lr: ``optim.lr``.

    Returns:
        One row per layer group plus a final ``total`` row. Counts are exact
        element counts, so the table doubles as a check of what was frozen.
    """
    trainable_ids = {id(p) for g in groups for _, p in g.params}
    lr_of = {id(p): base_lr * g.lr_multiplier for g in groups for _, p in g.params}
    total = sum(p.numel() for params in layer_groups.values() for p in params)
    rows = []
    for name, params in layer_groups.items():
        size = sum(p.numel() for p in params)
        train = [p for p in params if id(p) in trainable_ids]
        lrs = sorted({lr_of[id(p)] for p in train})
        rows.append(
            {
                "group": name,
                "parameters": size,
                "trainable": sum(p.numel() for p in train),
                "percent": 100.0 * sum(p.numel() for p in train) / total if total else 0.0,
                "lr": lrs[0] if len(lrs) == 1 else (lrs or None),
            }
        )
    trainable = sum(r["trainable"] for r in rows)
    rows.append(
        {
            "group": "total",
            "parameters": total,
            "trainable": trainable,
            "percent": 100.0 * trainable / total if total else 0.0,
            "lr": None,
        }
    )
    return rows


def format_parameter_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text rendering (logs and terminals alike)."""
    lines = [f"{'group':<22}{'parameters':>13}{'trainable':>13}{'% of model':>12}{'lr':>11}"]
    for r in rows:
        lr = r["lr"]
        lr_text = f"{lr:.2e}" if isinstance(lr, float) else ("mixed" if lr else "-")
        lines.append(
            f"{r['group']:<22}{r['parameters']:>13,}{r['trainable']:>13,}"
            f"{r['percent']:>11.2f}%{lr_text:>11}"
        )
    return "\n".join(lines)
