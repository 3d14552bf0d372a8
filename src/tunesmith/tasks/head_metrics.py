"""Metrics of the multi-label and regression heads, and the multi-label thresholds.

Computed with numpy on a whole split's outputs. Per-label and per-target
values use the flat keys of ``metrics.py`` (``f1/<label>``, ``rmse/<target>``)
so they fit one ``metrics.jsonl`` line; their direction is the family's
(``config/heads.py`` declares which families are lower-is-better).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: Candidate thresholds of each label: 0.05, 0.10, ..., 0.95.
THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    total = 2 * tp + fp + fn
    return np.divide(2 * tp, total, out=np.zeros_like(total, dtype=float), where=total > 0)


def tune_thresholds(
    probabilities: np.ndarray, references: np.ndarray, grid: Sequence[float] = THRESHOLD_GRID
) -> list[float]:
    """Per label, the grid threshold with the best F1 on these rows (ties: nearest 0.5).

    Meant for the validation split only: thresholds tuned on the rows they
    are then scored on overstate F1, so test metrics use the stored ones. A
    label with no positive row here keeps 0.5 (every threshold scores 0).

    Args:
        probabilities: ``(rows, labels)`` sigmoid outputs.
        references: ``(rows, labels)`` 0/1 gold labels.
    """
    probs, refs = np.asarray(probabilities, dtype=float), np.asarray(references) > 0.5
    cuts = np.asarray(grid, dtype=float)
    predicted = probs[None, :, :] >= cuts[:, None, None]  # (grid, rows, labels)
    tp = (predicted & refs).sum(axis=1)
    fp = (predicted & ~refs).sum(axis=1)
    fn = (~predicted & refs).sum(axis=1)
    f1 = _f1(tp, fp, fn)  # (grid, labels)
    # Best F1 first, then the threshold nearest 0.5 (argmax of a lexicographic score).
    closeness = -np.abs(cuts - 0.5)[:, None]
    best = np.lexsort((np.broadcast_to(closeness, f1.shape), np.round(f1, 12)), axis=0)[-1]
    chosen = cuts[best]
    return [0.5 if not refs[:, j].any() else float(chosen[j]) for j in range(probs.shape[1])]


def multi_label_metrics(
    probabilities: np.ndarray,
    references: np.ndarray,
    labels: Sequence[str],
    thresholds: Sequence[float],
) -> dict[str, Any]:
    """Micro/macro F1, subset accuracy and a per-label report at the given thresholds.

    Micro-F1 pools every (row, label) decision, so frequent labels weigh more;
    macro-F1 averages the labels' F1, a label never predicted counting 0.
    """
    refs = np.asarray(references) > 0.5
    predicted = np.asarray(probabilities) >= np.asarray(thresholds, dtype=float)[None, :]
    tp = (predicted & refs).sum(axis=0)
    fp = (predicted & ~refs).sum(axis=0)
    fn = (~predicted & refs).sum(axis=0)
    f1 = _f1(tp, fp, fn)
    precision = np.divide(tp, tp + fp, out=np.zeros(len(labels)), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros(len(labels)), where=(tp + fn) > 0)
    out: dict[str, Any] = {
        "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
        "macro_f1": float(f1.mean()) if len(labels) else 0.0,
        "subset_accuracy": float((predicted == refs).all(axis=1).mean()) if len(refs) else 0.0,
    }
    for j, lab in enumerate(labels):
        out[f"precision/{lab}"] = float(precision[j])
        out[f"recall/{lab}"] = float(recall[j])
        out[f"f1/{lab}"] = float(f1[j])
        out[f"support/{lab}"] = int(refs[:, j].sum())
        out[f"threshold/{lab}"] = float(thresholds[j])
    return out


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (as Spearman's rho needs)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            start = end
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0  # a constant has no correlation (and its mean's rounding would fake one)
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def regression_metrics(
    predictions: np.ndarray, references: np.ndarray, targets: Sequence[str]
) -> dict[str, Any]:
    """RMSE, MSE, MAE, Pearson's r and Spearman's rho, per target and overall.

    The overall errors pool every value (one target: that target's); the
    overall correlations are the targets' mean. A constant prediction has no
    correlation and scores 0 (scipy would return NaN, which no checkpoint
    comparison can use).
    """
    preds = np.asarray(predictions, dtype=float).reshape(len(predictions), -1)
    refs = np.asarray(references, dtype=float).reshape(len(references), -1)
    errors = preds - refs
    out: dict[str, Any] = {
        "rmse": float(np.sqrt((errors**2).mean())) if errors.size else 0.0,
        "mse": float((errors**2).mean()) if errors.size else 0.0,
        "mae": float(np.abs(errors).mean()) if errors.size else 0.0,
    }
    pearson, spearman = [], []
    for j, name in enumerate(targets):
        pearson.append(_pearson(preds[:, j], refs[:, j]))
        spearman.append(_pearson(_ranks(preds[:, j]), _ranks(refs[:, j])))
        out[f"rmse/{name}"] = float(np.sqrt((errors[:, j] ** 2).mean())) if len(refs) else 0.0
        out[f"mae/{name}"] = float(np.abs(errors[:, j]).mean()) if len(refs) else 0.0
        out[f"pearson/{name}"] = pearson[-1]
        out[f"spearman/{name}"] = spearman[-1]
    out["pearson"] = float(np.mean(pearson)) if pearson else 0.0
    out["spearman"] = float(np.mean(spearman)) if spearman else 0.0
    return out
