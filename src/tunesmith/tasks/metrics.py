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


def entity_metrics(
    references: Sequence[Sequence[str]],
    predictions: Sequence[Sequence[str]],
    entity_types: Sequence[str] = (),
) -> dict[str, Any]:
    """Entity-level precision/recall/F1 (micro, seqeval), per-type report, word accuracy.

    An entity counts as found only when its type and both boundaries match
    (seqeval's default, conlleval-compatible mode: an ``I-`` after ``O`` opens
    an entity). Per-type values use the same flat keys as classification
    (``f1/<type>``), so reports and the CLI table treat both alike; every type
    in ``entity_types`` is reported, with zeros when it never occurs, so the
    keys of ``metrics.jsonl`` stay the same across evaluations.

    Args:
        references: Gold tags, one list per sentence (one tag per word).
        predictions: Predicted tags, the same shape.
        entity_types: Types known from the label list (``PER`` for ``B-PER``).

    Returns:
        ``entity_precision``, ``entity_recall``, ``entity_f1``,
        ``entity_f1_se`` (its bootstrap standard error over sentences: a
        split with ~150 entities moves F1 by several points between seeds),
        ``token_accuracy`` (share of words whose tag is right) and per type
        ``precision/``, ``recall/``, ``f1/``, ``support/`` (gold entities).
    """
    from seqeval.metrics import sequence_labeling as seq

    refs, preds = [list(r) for r in references], [list(p) for p in predictions]
    words = sum(len(r) for r in refs)
    correct = sum(
        int(a == b) for r, p in zip(refs, preds, strict=True) for a, b in zip(r, p, strict=True)
    )
    precision, recall, f1 = 0.0, 0.0, 0.0
    if refs:  # seqeval refuses an empty split
        precision, recall, f1, _ = seq.precision_recall_fscore_support(
            refs, preds, average="micro", zero_division=0
        )
    out: dict[str, Any] = {
        "entity_precision": float(precision),
        "entity_recall": float(recall),
        "entity_f1": float(f1),
        "entity_f1_se": _f1_standard_error(refs, preds),
        "token_accuracy": correct / words if words else 0.0,
    }
    found = {t for t, _, _ in seq.get_entities(refs)} | {t for t, _, _ in seq.get_entities(preds)}
    per_type: dict[str, tuple[float, float, float, int]] = dict.fromkeys(
        entity_types, (0.0, 0.0, 0.0, 0)
    )
    if found:  # seqeval orders the per-type rows by sorted type name
        rows = zip(
            *seq.precision_recall_fscore_support(refs, preds, average=None, zero_division=0),
            strict=True,
        )
        per_type.update(zip(sorted(found), rows, strict=True))
    for name in sorted(per_type):
        p, r, f, s = per_type[name]
        out[f"precision/{name}"] = float(p)
        out[f"recall/{name}"] = float(r)
        out[f"f1/{name}"] = float(f)
        out[f"support/{name}"] = int(s)
    return out


def _f1_standard_error(
    references: Sequence[Sequence[str]],
    predictions: Sequence[Sequence[str]],
    resamples: int = 200,
    seed: int = 0,
) -> float:
    """Bootstrap standard error of micro entity F1, resampling whole sentences.

    Entities never cross sentences, so per-sentence counts of correct, gold
    and predicted entities add up to seqeval's totals; resampling those counts
    is exact and cheap (no re-parsing per resample). Seeded: same input, same value.
    """
    import numpy as np
    from seqeval.metrics.sequence_labeling import get_entities

    counts = np.array(
        [
            (len(gold & pred), len(gold), len(pred))
            for gold, pred in (
                (set(get_entities(list(r))), set(get_entities(list(p))))
                for r, p in zip(references, predictions, strict=True)
            )
        ],
        dtype=np.float64,
    ).reshape(-1, 3)
    n = len(counts)
    if n < 2 or not counts[:, 1:].any():
        return 0.0
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(0, resamples, 20):  # 20 resamples at a time bounds the memory
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=20)
        correct, gold, pred = (weights @ counts).T
        total = gold + pred
        scores.append(np.divide(2 * correct, total, out=np.zeros_like(total), where=total > 0))
    return float(np.concatenate(scores).std(ddof=1))
