"""Deterministic, label-stratified splitting and subsampling.

Splits are computed on indices, not records, so callers can keep a single
list of records and reproduce exactly the same split from the same seed. Each
label's rows are shuffled once and quotas are apportioned by largest
remainder, which keeps per-label proportions within one row of the ideal
while making split sizes add up exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from tunesmith.data.labels import sort_labels
from tunesmith.errors import DataError

SPLITS = ("train", "validation", "test")


def stratified_split(
    records: Sequence[Mapping[str, Any]],
    *,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, list[int]]:
    """Split record indices into train/validation/test, stratified by label.

    Split sizes are ``round(n * fraction)``; every requested split gets at
    least one row of each label with 3 or more rows (possibly exceeding that
    size by a row per label), and a label's rows are never all moved out of
    training. Unlabeled records are split plainly at random.

    Args:
        records: Records with a ``label`` key (may be ``None``).
        validation_fraction: Share of rows for validation; 0 for none.
        test_fraction: Share of rows for test; 0 for none.
        seed: Seed for the shuffle; the same seed gives the same split.

    Returns:
        Sorted, disjoint indices for ``"train"``, ``"validation"``, ``"test"``
        that together cover every record.

    Raises:
        DataError: If fractions are invalid or there are too few rows to fill
            a requested split.
    """
    fractions = {"validation": validation_fraction, "test": test_fraction}
    _check_fractions(fractions)
    n = len(records)
    targets = {split: round(n * fraction) for split, fraction in fractions.items()}
    _check_targets(n, fractions, targets)
    groups = _shuffled_groups(records, range(n), seed)
    taken = dict.fromkeys(groups, 0)
    result: dict[str, list[int]] = {split: [] for split in SPLITS}
    for split in ("validation", "test"):
        if targets[split] == 0:
            continue
        later_needs_one = split == "validation" and targets["test"] > 0
        quota = _split_quota(groups, taken, targets[split], n, later_needs_one)
        if sum(quota.values()) == 0:
            raise DataError(
                f"cannot fill the {split} split: {n} rows and every label has a single row, "
                "which must stay in training; add rows or set its fraction to 0"
            )
        for label, count in quota.items():
            result[split].extend(groups[label][taken[label] : taken[label] + count])
            taken[label] += count
    for label, indices in groups.items():
        result["train"].extend(indices[taken[label] :])
    return {split: sorted(indices) for split, indices in result.items()}


def grouped_split(
    records: Sequence[Mapping[str, Any]],
    *,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, list[int]]:
    """Split record indices keeping all records of a ``group`` on one side.

    For data where several rows share one input (the same question with
    different answers), a plain split would let the model see held-out
    questions in training. Whole groups, shuffled with ``seed``, fill the
    validation and then the test split up to ``round(n * fraction)`` rows
    (the last group may overshoot); the rest train.

    Raises:
        DataError: A requested split would be empty, or nothing is left to train on.
    """
    fractions = {"validation": validation_fraction, "test": test_fraction}
    _check_fractions(fractions)
    n = len(records)
    targets = {split: round(n * fraction) for split, fraction in fractions.items()}
    _check_targets(n, fractions, targets)
    members: dict[Hashable, list[int]] = {}
    for i, record in enumerate(records):
        members.setdefault(record.get("group"), []).append(i)
    keys = list(members)
    random.Random(seed).shuffle(keys)
    result: dict[str, list[int]] = {split: [] for split in SPLITS}
    for split in ("validation", "test"):
        while targets[split] and len(result[split]) < targets[split] and len(keys) > 1:
            result[split].extend(members[keys.pop()])
    result["train"] = [i for key in keys for i in members[key]]
    return {split: sorted(indices) for split, indices in result.items()}


def cap_records(
    indices: list[int],
    max_n: int | None,
    records: Sequence[Mapping[str, Any]],
    seed: int,
) -> list[int]:
    """Subsample ``indices`` to at most ``max_n``, keeping label proportions.

    Used for quick runs (``max_train_samples`` and friends): a plain head
    slice could drop whole classes when files are sorted by label.

    Args:
        indices: Indices into ``records`` to choose from.
        max_n: Upper bound, or ``None`` for no cap.
        records: Records with a ``label`` key.
        seed: Seed for the deterministic choice.

    Returns:
        The chosen indices, sorted; every label keeps at least one row when
        ``max_n`` is at least the number of labels.
    """
    if max_n is None or len(indices) <= max_n:
        return list(indices)
    if max_n < 1:
        raise DataError(f"a sample cap must be at least 1, got {max_n}")
    groups = _shuffled_groups(records, indices, seed)
    n = len(indices)
    floor_one = max_n >= len(groups)
    quota = _apportion(
        ideal={label: len(g) * max_n / n for label, g in groups.items()},
        total=max_n,
        minimum={label: 1 if floor_one else 0 for label in groups},
        cap={label: len(g) for label, g in groups.items()},
    )
    return sorted(i for label, g in groups.items() for i in g[: quota[label]])


def per_class(
    indices: list[int], k: int, records: Sequence[Mapping[str, Any]], seed: int
) -> list[int]:
    """At most ``k`` of ``indices`` per label, chosen at random with ``seed`` (K-shot data).

    Each label's rows are shuffled with the same seeded shuffle as the
    splits, so K-shot sets of one seed are nested: the 16-shot rows are
    among the 64-shot rows.
    """
    groups = _shuffled_groups(records, indices, seed)
    return sorted(i for group in groups.values() for i in group[:k])


def _check_fractions(fractions: Mapping[str, float]) -> None:
    """Fractions must be in [0, 1) and leave room for training."""
    for split, fraction in fractions.items():
        if not 0 <= fraction < 1:
            raise DataError(f"data.{split}_fraction must be in [0, 1), got {fraction}")
    if sum(fractions.values()) >= 1:
        raise DataError(
            "data.validation_fraction + data.test_fraction must be below 1, "
            f"got {sum(fractions.values())}"
        )


def _check_targets(n: int, fractions: Mapping[str, float], targets: Mapping[str, int]) -> None:
    """Refuse splits that would be empty although they were requested."""
    for split, fraction in fractions.items():
        if fraction > 0 and targets[split] == 0:
            raise DataError(
                f"the {split} split would be empty: {n} rows x data.{split}_fraction {fraction} "
                f"rounds to 0 rows; add rows, raise the fraction or set it to 0"
            )
    if n - sum(targets.values()) < 1:
        raise DataError(
            f"only {n} rows: validation ({targets['validation']}) and test "
            f"({targets['test']}) leave no rows for training; add rows or lower the fractions"
        )


def _shuffled_groups(
    records: Sequence[Mapping[str, Any]], indices: Sequence[int], seed: int
) -> dict[Hashable, list[int]]:
    """Group indices by label (stable label order) and shuffle each group."""
    by_label: dict[Hashable, list[int]] = {}
    for i in indices:
        by_label.setdefault(records[i].get("label"), []).append(i)
    labelled = sort_labels(label for label in by_label if label is not None)
    order: list[Hashable] = [*labelled, *([None] if None in by_label else [])]
    rng = random.Random(seed)
    groups = {label: by_label[label] for label in order}
    for group in groups.values():
        rng.shuffle(group)
    return groups


def _split_quota(
    groups: Mapping[Hashable, list[int]],
    taken: Mapping[Hashable, int],
    total: int,
    n: int,
    later_needs_one: bool,
) -> dict[Hashable, int]:
    """Per-label row counts for one split.

    One row per label stays in training, and one more is held back for the
    test split when it follows, so both minimum guarantees can be met.
    """
    cap: dict[Hashable, int] = {}
    minimum: dict[Hashable, int] = {}
    for label, group in groups.items():
        size = len(group)
        reserve = 1 + (1 if later_needs_one and size >= 3 else 0)
        cap[label] = max(0, size - taken[label] - reserve)
        minimum[label] = min(1, cap[label]) if size >= 3 else 0
    ideal = {label: len(group) * total / n for label, group in groups.items()}
    return _apportion(ideal=ideal, total=total, minimum=minimum, cap=cap)


def _apportion(
    *,
    ideal: Mapping[Hashable, float],
    total: int,
    minimum: Mapping[Hashable, int],
    cap: Mapping[Hashable, int],
) -> dict[Hashable, int]:
    """Largest-remainder apportionment within per-key bounds.

    Starts from the floors (clamped to ``[minimum, cap]``) and hands out or
    takes back single units by remainder until the sum is ``total`` or the
    bounds make that impossible; ties go to the earlier key.
    """
    quota = {k: min(max(math.floor(ideal[k]), minimum[k]), cap[k]) for k in ideal}
    diff = total - sum(quota.values())
    while diff != 0:
        step = 1 if diff > 0 else -1
        eligible = [k for k in ideal if (quota[k] < cap[k] if step > 0 else quota[k] > minimum[k])]
        if not eligible:
            break
        eligible.sort(key=lambda k: ideal[k] - quota[k], reverse=step > 0)
        for k in eligible[: abs(diff)]:
            quota[k] += step
            diff -= step
    return quota
