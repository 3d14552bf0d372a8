"""What the training inputs looked like, kept with a checkpoint to see drift when serving.

A served model meets inputs that may drift away from what it was trained on
(longer texts, another mix of classes). The checkpoint keeps a small profile
of its training split: the deciles of the input length in tokens (the
prompt for generative tasks, whose replies are not inputs at serving time)
and, for single-label classifiers, the share of every label. The server
compares the inputs and predictions it sees with it (``serve.metrics``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from tunesmith.data.batching import IGNORE


def input_length(feature: dict[str, Any]) -> int:
    """Tokens the user supplies: the prompt before the first trained token, else all of them."""
    ids = feature["input_ids"]
    labels = feature.get("labels")
    if isinstance(labels, list) and len(labels) == len(ids):
        for position, label in enumerate(labels):
            if label != IGNORE:
                return position
    return len(ids)


def length_deciles(lengths: Sequence[int]) -> list[float]:
    """The 10th, 20th, ..., 90th percentiles of ``lengths``."""
    return [float(v) for v in np.quantile(np.asarray(lengths, dtype=float), np.arange(1, 10) / 10)]


def data_profile(features: Sequence[dict[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """Deciles and mean of the input lengths; label shares when each row has one label id."""
    lengths = [input_length(f) for f in features]
    profile: dict[str, Any] = {"rows": len(features)}
    if lengths:
        profile["input_tokens"] = {
            "mean": round(float(np.mean(lengths)), 3),
            "deciles": length_deciles(lengths),
        }
    ids = [f.get("labels") for f in features]
    if labels and ids and all(isinstance(i, int) and 0 <= i < len(labels) for i in ids):
        counts = Counter(ids)
        profile["labels"] = {labels[i]: round(counts[i] / len(ids), 6) for i in range(len(labels))}
    return profile


def population_stability(expected: Sequence[float], actual: Sequence[float]) -> float:
    """PSI = sum((a - e) * ln(a / e)) over bins of two distributions (shares).

    Under 0.1 is usually read as no shift, 0.1-0.25 as a moderate one, above
    0.25 as a large one. Empty bins count as 1e-4 so the sum stays finite.
    """
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, 1e-4), max(a, 1e-4)
        total += (a - e) * float(np.log(a / e))
    return total


def decile_shares(lengths: Sequence[int], deciles: Sequence[float]) -> list[float]:
    """Share of ``lengths`` in each of the 10 bins the training deciles bound."""
    bins = np.searchsorted(np.asarray(deciles), np.asarray(lengths, dtype=float), side="right")
    counts = np.bincount(bins, minlength=len(deciles) + 1)
    return [float(c) / max(len(lengths), 1) for c in counts]
