"""Reading the targets of multi-label and regression rows: label sets and numbers.

A single-label row has one label, read and normalised by ``loading``. The
other heads of sequence classification need more per row: a *set* of labels
(a list column, or a delimited string such as ``"PER|LOC"``; an empty cell
is a row with no label, which is data, not a gap) or one *number* per target
column. A :class:`TargetReader` says which columns hold them and how one
row's values become the record's ``targets``; ``load_records`` applies it, so
every error still names file, row and key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tunesmith.data.labels import normalise_label, sort_labels
from tunesmith.errors import DataError


@dataclass(frozen=True)
class TargetReader:
    """Where a row's targets are and how they are read.

    Attributes:
        columns: The columns holding the targets.
        config_key: The key naming those columns (for messages).
        parse: ``(source, raw row) -> targets``, or None when the row has none
            (an empty regression value: dropped like an empty label).
    """

    columns: tuple[str, ...]
    config_key: str
    parse: Callable[[str, Mapping[str, Any]], Any]


def label_set_reader(column: str, delimiter: str | None) -> TargetReader:
    """Multi-label: each row's labels, a sorted list of distinct names (maybe empty)."""

    def parse(source: str, raw: Mapping[str, Any]) -> list[str]:
        value = raw.get(column)
        if isinstance(value, str):
            items: Sequence[Any] = value.split(delimiter) if delimiter else [value]
        elif isinstance(value, list | tuple):
            items = value
        elif value is None or (isinstance(value, float) and math.isnan(value)):
            items = []
        else:
            raise DataError(
                f"{source}: column {column!r} must hold a list of labels or text "
                f"(data.label_delimiter), got {value!r}"
            )
        try:
            labels = (normalise_label(v) for v in items)
            return sort_labels(label for label in labels if label is not None)
        except TypeError as err:
            raise DataError(f"{source}: column {column!r}: {err}") from None

    return TargetReader((column,), "data.label_column", parse)


def number_reader(columns: Sequence[str]) -> TargetReader:
    """Regression: one float per column, in column order; None when any is empty."""

    def parse(source: str, raw: Mapping[str, Any]) -> list[float] | None:
        values = []
        for column in columns:
            value = raw.get(column)
            if isinstance(value, str):
                value = value.strip() or None
            if value is None or (isinstance(value, float) and math.isnan(value)):
                return None
            try:
                if isinstance(value, bool):
                    raise ValueError
                number = float(value)
            except (TypeError, ValueError):
                raise DataError(
                    f"{source}: column {column!r} must hold a number (regression target, "
                    f"data.label_columns), got {value!r}"
                ) from None
            if not math.isfinite(number):
                raise DataError(
                    f"{source}: column {column!r} holds {value!r}; give a finite number"
                )
            values.append(number)
        return values

    return TargetReader(tuple(columns), "data.label_columns", parse)


def check_label_sets(
    records: Sequence[Mapping[str, Any]], label2id: Mapping[str, int], split: str
) -> None:
    """Fail on the first row of ``split`` naming a label the model was not trained on.

    Raises:
        DataError: Naming the row, the label and the training labels.
    """
    for record in records:
        unseen = [lab for lab in record.get("targets") or () if lab not in label2id]
        if unseen:
            raise DataError(
                f"{record.get('source', '?')}: label {unseen[0]!r} in {split} never appears "
                f"in training (training labels: {', '.join(label2id)}); remove it or add "
                "training rows with it"
            )


def keep_listed(records: Sequence[dict[str, Any]], allowed: Sequence[str]) -> dict[str, int]:
    """Remove unlisted labels (``data.labels``) from every row's set; count them per label."""
    keep = set(allowed)
    removed: dict[str, int] = {}
    for record in records:
        labels = record.get("targets") or []
        for lab in labels:
            if lab not in keep:
                removed[lab] = removed.get(lab, 0) + 1
        record["targets"] = [lab for lab in labels if lab in keep]
    return removed
