"""Label normalisation, ordering and consistency checks.

Labels arrive from many formats (CSV strings, JSON numbers, Parquet booleans),
so they are normalised to stripped ``str`` once at load time; everything
downstream (label lists, ``label2id``, metrics) can then compare plain strings.
The label order defines the model's class ids, so it must be stable across
runs: it never depends on row order.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tunesmith.errors import DataError

_INT_RE = re.compile(r"[+-]?\d+")
_MAX_LISTED = 20


def normalise_label(value: Any) -> str | None:
    """Turn a raw label value into a stripped string, or ``None`` when absent.

    Numbers are rendered canonically so that ``1``, ``1.0`` and ``"1"`` from
    different file formats end up as the same class ``"1"``.

    Args:
        value: The raw value read from a data file.

    Returns:
        The label as a string, or ``None`` for missing values (``None``, NaN,
        empty or whitespace-only strings).

    Raises:
        TypeError: If the value is not a string, number or boolean; the loader
            turns this into a ``DataError`` that names the row.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value.strip() or None
    raise TypeError(f"a label must be a string or a number, got {type(value).__name__}")


def label_sort_key(labels: Iterable[str]) -> Any:
    """Return a sort key that orders integer labels numerically, others as text.

    ``"2"`` must sort before ``"10"`` when every label is an integer, otherwise
    class ids would follow an unintuitive lexical order.
    """
    labels = list(labels)
    if labels and all(_INT_RE.fullmatch(label) for label in labels):
        return int
    return str


def sort_labels(labels: Iterable[str]) -> list[str]:
    """Sort distinct labels with :func:`label_sort_key`."""
    unique = set(labels)
    return sorted(unique, key=label_sort_key(unique))


def build_label_list(
    records: Sequence[Mapping[str, Any]], allowed: Sequence[str] | None = None
) -> list[str]:
    """Return the stable, ordered list of class labels.

    Args:
        records: Loaded records (``label`` already normalised).
        allowed: Labels configured by the user; their order wins so that the
            user controls class ids. Duplicates are dropped.

    Returns:
        ``allowed`` (normalised, deduplicated) when given, else the sorted
        distinct labels of ``records`` (numeric order when all are integers).
    """
    if allowed is not None:
        normalised = (normalise_label(label) for label in allowed)
        return list(dict.fromkeys(label for label in normalised if label is not None))
    return sort_labels(r["label"] for r in records if r.get("label") is not None)


def label_counts(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Count rows per label, in label-list order; unlabeled rows are not counted."""
    counts = Counter(r["label"] for r in records if r.get("label") is not None)
    return {label: counts[label] for label in sort_labels(counts)}


def _join_limited(items: Sequence[str]) -> str:
    """Join names for a one-line message, eliding long lists."""
    if len(items) <= _MAX_LISTED:
        return ", ".join(items)
    rest = len(items) - _MAX_LISTED
    return ", ".join(items[:_MAX_LISTED]) + f", ... and {rest} more"


def check_labels(
    records: Sequence[Mapping[str, Any]], label2id: Mapping[str, int], split: str
) -> None:
    """Fail early when a split holds labels the model was never trained on.

    An unseen label would otherwise crash deep inside metric computation or,
    worse, be silently mapped to a wrong class id.

    Args:
        records: Records of the split to check; unlabeled rows are skipped.
        label2id: The training label mapping.
        split: Split name used in the message (e.g. ``"validation"``).

    Raises:
        DataError: Naming the first offending row, its label, the number of
            affected rows and the known training labels.
    """
    unseen = [r for r in records if r.get("label") is not None and r["label"] not in label2id]
    if not unseen:
        return
    first = unseen[0]
    others = sort_labels(r["label"] for r in unseen)
    known = _join_limited(sort_labels(label2id))
    rows = "1 row has" if len(unseen) == 1 else f"{len(unseen)} rows have"
    raise DataError(
        f"{first.get('source', '?')}: label {first['label']!r} in {split} never appears in "
        f"training (training labels: {known}); {rows} unseen labels "
        f"({_join_limited([repr(x) for x in others])}); remove those rows or add examples "
        "of those labels to the training data"
    )
