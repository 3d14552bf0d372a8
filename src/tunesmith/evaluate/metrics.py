"""Task metrics computed from whole-split predictions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sklearn.metrics import f1_score, precision_recall_fscore_support


def classification_metrics(
    references: Sequence[int], predictions: Sequence[int], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1 and a per-class precision/recall/F1/support report.

    Per-class values use flat keys (``f1/<label>``) so they fit one
    ``metrics.jsonl`` line; macro-F1 averages over every known label, so a
    class the model never predicts counts as F1 0 rather than vanishing.
    """
    ids = list(range(len(labels)))
    n = len(references)
    correct = sum(int(r == p) for r, p in zip(references, predictions, strict=True))
    out: dict[str, Any] = {
        "accuracy": correct / n if n else 0.0,
        "macro_f1": float(
            f1_score(references, predictions, labels=ids, average="macro", zero_division=0)
        ),
    }
    prec, rec, f1, support = precision_recall_fscore_support(
        references, predictions, labels=ids, zero_division=0
    )
    for i, lab in enumerate(labels):
        out[f"precision/{lab}"] = float(prec[i])
        out[f"recall/{lab}"] = float(rec[i])
        out[f"f1/{lab}"] = float(f1[i])
        out[f"support/{lab}"] = int(support[i])
    return out
