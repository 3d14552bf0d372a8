"""Tests for tunesmith.data.labels and tunesmith.data.splits."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tunesmith.data import (
    build_label_list,
    cap_records,
    check_labels,
    label_counts,
    normalise_label,
    stratified_split,
)
from tunesmith.errors import DataError


def make(labels: list[str | None]) -> list[dict[str, Any]]:
    return [
        {"text": f"t{i}", "label": label, "source": f"train.csv:{i + 2}"}
        for i, label in enumerate(labels)
    ]


def unbalanced() -> list[dict[str, Any]]:
    return make(["a"] * 50 + ["b"] * 30 + ["c"] * 17 + ["d"] * 3)


# -- labels --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(1, "1"), (1.0, "1"), (0.5, "0.5"), (True, "true"), (False, "false"), (" x ", "x")],
)
def test_normalise_label(raw: object, expected: str) -> None:
    assert normalise_label(raw) == expected


@pytest.mark.parametrize("raw", [None, "", "   ", float("nan")])
def test_normalise_missing_label(raw: object) -> None:
    assert normalise_label(raw) is None


def test_label_list_sorts_integers_numerically() -> None:
    assert build_label_list(make(["10", "2", "1", "2", "-1"])) == ["-1", "1", "2", "10"]


def test_label_list_sorts_text_lexically() -> None:
    assert build_label_list(make(["pos", "neg", "10", "2", None])) == ["10", "2", "neg", "pos"]


def test_label_list_follows_allowed_order() -> None:
    records = make(["neg", "pos"])
    assert build_label_list(records, ["pos", "neg", "neutral"]) == ["pos", "neg", "neutral"]
    assert build_label_list(records, [1, 0, 1]) == ["1", "0"]  # type: ignore[list-item]


def test_label_counts() -> None:
    assert label_counts(make(["b", "a", "b", None, "10"])) == {"10": 1, "a": 1, "b": 2}
    assert list(label_counts(make(["10", "9", "10"]))) == ["9", "10"]


def test_check_labels_passes_for_known_labels() -> None:
    check_labels(make(["neg", "pos", None]), {"neg": 0, "pos": 1}, "validation")


def test_check_labels_names_first_unseen_row() -> None:
    records = [
        {"text": "a", "label": "pos", "source": "dev.csv:7"},
        {"text": "b", "label": "neutral", "source": "dev.csv:8"},
        {"text": "c", "label": "mixed", "source": "dev.csv:9"},
        {"text": "d", "label": "neutral", "source": "dev.csv:10"},
    ]
    with pytest.raises(DataError) as info:
        check_labels(records, {"negative": 0, "pos": 1}, "validation")
    message = str(info.value)
    assert message.startswith(
        "dev.csv:8: label 'neutral' in validation never appears in training "
        "(training labels: negative, pos)"
    )
    assert "3 rows have unseen labels" in message and "'mixed'" in message
    assert "\n" not in message


# -- stratified_split ----------------------------------------------------------


def check_partition(splits: dict[str, list[int]], n: int) -> None:
    flat = splits["train"] + splits["validation"] + splits["test"]
    assert sorted(flat) == list(range(n))  # disjoint and complete


def test_split_is_disjoint_complete_and_sized() -> None:
    records = unbalanced()
    splits = stratified_split(records, validation_fraction=0.2, test_fraction=0.1, seed=1)
    check_partition(splits, len(records))
    assert (len(splits["validation"]), len(splits["test"])) == (20, 10)


def test_split_keeps_label_proportions_within_one_row() -> None:
    records = unbalanced()
    sizes = Counter(r["label"] for r in records)
    splits = stratified_split(records, validation_fraction=0.2, test_fraction=0.1, seed=3)
    for name, fraction in (("validation", 0.2), ("test", 0.1)):
        got = Counter(records[i]["label"] for i in splits[name])
        for label, size in sizes.items():
            assert abs(got[label] - size * fraction) <= 1, (name, label, got)


def test_split_gives_every_split_each_label_with_three_rows() -> None:
    records = make(["a"] * 95 + ["b"] * 3 + ["c"] * 2)
    splits = stratified_split(records, validation_fraction=0.1, test_fraction=0.1, seed=0)
    for name in ("train", "validation", "test"):
        assert "b" in {records[i]["label"] for i in splits[name]}, name
    assert "c" in {records[i]["label"] for i in splits["train"]}


def test_single_row_label_stays_in_training() -> None:
    records = make(["a"] * 20 + ["rare"])
    for seed in range(5):
        splits = stratified_split(records, validation_fraction=0.3, test_fraction=0.0, seed=seed)
        assert 20 in splits["train"]


def test_split_is_deterministic_per_seed() -> None:
    records = unbalanced()
    first = stratified_split(records, validation_fraction=0.2, test_fraction=0.1, seed=42)
    again = stratified_split(records, validation_fraction=0.2, test_fraction=0.1, seed=42)
    other = stratified_split(records, validation_fraction=0.2, test_fraction=0.1, seed=43)
    assert first == again
    assert first["validation"] != other["validation"]


def test_zero_fractions_give_empty_splits() -> None:
    records = unbalanced()
    splits = stratified_split(records, validation_fraction=0.25, test_fraction=0.0, seed=0)
    assert splits["test"] == [] and len(splits["validation"]) == 25
    check_partition(splits, len(records))
    splits = stratified_split(records, validation_fraction=0.0, test_fraction=0.0, seed=0)
    assert splits == {"train": list(range(len(records))), "validation": [], "test": []}


def test_unlabeled_records_split_randomly() -> None:
    records = make([None] * 40)
    splits = stratified_split(records, validation_fraction=0.25, test_fraction=0.1, seed=5)
    check_partition(splits, 40)
    assert (len(splits["validation"]), len(splits["test"])) == (10, 4)
    assert splits["validation"] != list(range(10))


def test_too_few_rows_for_a_requested_split() -> None:
    with pytest.raises(DataError, match=r"validation split would be empty: 4 rows"):
        stratified_split(make(["a"] * 4), validation_fraction=0.1, test_fraction=0.0, seed=0)


def test_no_rows_left_for_training() -> None:
    with pytest.raises(DataError, match=r"only 2 rows"):
        stratified_split(make(["a", "b"]), validation_fraction=0.5, test_fraction=0.4, seed=0)


def test_split_impossible_when_every_label_is_unique() -> None:
    with pytest.raises(DataError, match=r"cannot fill the validation split: 10 rows"):
        stratified_split(make([str(i) for i in range(10)]), validation_fraction=0.2,
                         test_fraction=0.0, seed=0)  # fmt: skip


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.0), (1.0, 0.0), (0.6, 0.5)])
def test_invalid_fractions(val: float, test: float) -> None:
    with pytest.raises(DataError, match="fraction"):
        stratified_split(unbalanced(), validation_fraction=val, test_fraction=test, seed=0)


# -- cap_records ---------------------------------------------------------------


def test_cap_records_keeps_proportions_and_is_deterministic() -> None:
    records = unbalanced()
    indices = list(range(len(records)))
    capped = cap_records(indices, 20, records, seed=7)
    assert len(capped) == 20 and set(capped) <= set(indices)
    assert len(set(capped)) == 20
    got = Counter(records[i]["label"] for i in capped)
    assert got == {"a": 10, "b": 6, "c": 3, "d": 1}
    assert cap_records(indices, 20, records, seed=7) == capped
    assert cap_records(indices, 20, records, seed=8) != capped


def test_cap_records_only_chooses_from_given_indices() -> None:
    records = unbalanced()
    subset = list(range(0, 100, 2))
    capped = cap_records(subset, 10, records, seed=0)
    assert len(capped) == 10 and set(capped) <= set(subset)


def test_cap_records_keeps_rare_labels() -> None:
    records = make(["a"] * 98 + ["b", "c"])
    capped = cap_records(list(range(100)), 5, records, seed=0)
    assert {records[i]["label"] for i in capped} == {"a", "b", "c"}
    assert len(capped) == 5


def test_cap_records_without_cap_or_below_it() -> None:
    records = unbalanced()
    assert cap_records([3, 1, 2], None, records, seed=0) == [3, 1, 2]
    assert cap_records([3, 1, 2], 10, records, seed=0) == [3, 1, 2]
    with pytest.raises(DataError):
        cap_records([3, 1, 2], 0, records, seed=0)


def test_largest_remainders_get_the_extra_rows() -> None:
    records = make(["a"] * 57 + ["b"] * 28 + ["c"] * 15)  # 10% ideal: 5.7, 2.8, 1.5
    splits = stratified_split(records, validation_fraction=0.1, test_fraction=0.0, seed=0)
    assert Counter(records[i]["label"] for i in splits["validation"]) == {"a": 6, "b": 3, "c": 1}
    capped = cap_records(list(range(100)), 10, records, seed=0)
    assert Counter(records[i]["label"] for i in capped) == {"a": 6, "b": 3, "c": 1}
