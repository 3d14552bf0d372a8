"""Per-class loss weights: given by the user, or computed from the training labels.

Resolved once per run, after the training split is encoded (so token
classification counts the supervised sub-tokens the loss actually sees), and
saved in the checkpoint's manifest: ``eval`` then reports the same weighted
loss after reloading, whatever the data it is given.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tunesmith.config.base import suggest
from tunesmith.config.losses import LossConfig, Weights
from tunesmith.errors import ConfigError
from tunesmith.tasks.losses.token import IGNORE


def label_counts(features: Iterable[Mapping[str, Any]], num_labels: int) -> list[int]:
    """How often each class id is a supervised target in ``features`` (-100 ignored)."""
    counts: Counter[int] = Counter()
    for feature in features:
        labels = feature.get("labels")
        if labels is None:
            continue
        counts.update(lab for lab in (labels if isinstance(labels, list) else [labels]))
    counts.pop(IGNORE, None)
    return [counts.get(i, 0) for i in range(num_labels)]


def computed_weights(counts: Sequence[int], mode: str, beta: float = 0.999) -> list[float]:
    """Weights from class frequencies, scaled to a mean of 1 over the classes.

    ``inverse``: ``N / (C * n_c)`` (scikit-learn's "balanced"); ``effective``:
    ``(1 - beta) / (1 - beta ** n_c)``, the inverse effective number of
    samples (Cui et al., CVPR 2019), which flattens the inverse weights of very
    frequent classes. A class absent from training counts as one example: it
    never is a training target, but evaluation may meet it.

    The scale does not change a weighted mean; it keeps the numbers readable.
    """
    n = [max(int(c), 1) for c in counts]
    if mode == "inverse":
        raw = [sum(n) / (len(n) * c) for c in n]
    elif mode == "effective":
        raw = [(1 - beta) / (1 - beta**c) if beta > 0 else 1.0 for c in n]
    else:
        raise ValueError(f"unknown class-weight mode {mode!r}")
    mean = sum(raw) / len(raw)
    return [w / mean for w in raw]


def listed_weights(key: str, given: Weights, labels: Sequence[str]) -> list[float]:
    """A list (label order) or ``{label: weight}`` mapping as one weight per label.

    Raises:
        ConfigError: The list has the wrong length or the mapping names an unknown label.
    """
    if isinstance(given, list):
        if len(given) != len(labels):
            raise ConfigError(
                f"loss.{key}: {len(given)} weights for {len(labels)} labels "
                f"({', '.join(labels)}); give one per label, in that order, or a mapping"
            )
        return [float(w) for w in given]
    unknown = [name for name in given if name not in labels]
    if unknown:
        raise ConfigError(
            f"loss.{key}: unknown label {unknown[0]!r}{suggest(unknown[0], labels)} "
            f"(labels: {', '.join(labels)})"
        )
    return [float(given.get(name, 1.0)) for name in labels]


def resolve_class_weights(
    cfg: LossConfig, labels: Sequence[str], features: Iterable[Mapping[str, Any]]
) -> list[float] | None:
    """The run's per-class weights: ``class_weights`` times ``focal_alpha`` (None: none)."""
    weights: list[float] | None = None
    if isinstance(cfg.class_weights, str):
        counts = label_counts(features, len(labels))
        weights = computed_weights(counts, cfg.class_weights, cfg.effective_beta)
    elif cfg.class_weights is not None:
        weights = listed_weights("class_weights", cfg.class_weights, labels)
    if cfg.type == "focal" and cfg.focal_alpha is not None:
        alpha = listed_weights("focal_alpha", cfg.focal_alpha, labels)
        weights = [a * w for a, w in zip(alpha, weights or [1.0] * len(alpha), strict=True)]
    return [round(w, 8) for w in weights] if weights is not None else None
