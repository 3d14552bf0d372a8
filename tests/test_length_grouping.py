"""Length grouping's label check: the statistic, the window decision and its wiring."""

from __future__ import annotations

import logging
import random

import pytest

from tunesmith.data.batching import EpochSampler
from tunesmith.data.length_labels import (
    band_label_counts,
    grouped_label_spread,
    length_label_counts,
)
from tunesmith.tasks.grouping import LABEL_SPREAD_LIMIT, choose_window


def _spread(lengths, labels, batch_size=16, bands=50):
    return grouped_label_spread(length_label_counts(lengths, labels), batch_size, bands)


def _independent(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Review-like lengths and three labels drawn apart from them."""
    rng = random.Random(seed)
    return [rng.randint(5, 64) for _ in range(n)], [rng.randrange(3) for _ in range(n)]


def _one_class_longer(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Class 2 is two texts joined: about twice as long as classes 0 and 1."""
    rng = random.Random(seed)
    labels = [i % 3 for i in range(n)]
    lengths = [rng.randint(5, 50) + (rng.randint(5, 50) if y == 2 else 0) for y in labels]
    return lengths, labels


def test_spread_by_hand():
    # Two bands, each holding one class: chi2 = 4, one degree of freedom subtracted,
    # phi2 = 3/4; batches of 4 add (4 - 1) * 3/4 to random batches' 1.
    assert _spread([1, 1, 2, 2], ["a", "a", "b", "b"], batch_size=4, bands=2) == pytest.approx(3.25)


def test_ties_are_shared_across_bands_in_proportion():
    table = band_label_counts(length_label_counts([5, 5, 5, 5, 9, 9], list("aabbab")), 3)
    assert [dict(band) for band in table] == [
        {"a": 1.0, "b": 1.0},
        {"a": 1.0, "b": 1.0},
        {"a": 1.0, "b": 1.0},
    ]
    assert _spread([7] * 40, [i % 2 for i in range(40)], bands=4) == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_length_apart_from_the_label_passes(seed):
    lengths, labels = _independent(800, seed)
    for bands in (2, 6, 12, 50):
        assert _spread(lengths, labels, bands=bands) < LABEL_SPREAD_LIMIT


def test_length_that_predicts_the_label_is_caught():
    lengths, labels = _one_class_longer(800)
    assert _spread(lengths, labels, bands=12) > 2.5
    assert _spread(lengths, labels, bands=2) > LABEL_SPREAD_LIMIT


def test_no_spread_without_bands_or_classes():
    lengths, labels = _one_class_longer(300)
    assert _spread(lengths, labels, bands=1) == 1.0
    assert _spread(lengths, [0] * 300) == 1.0
    with pytest.raises(ValueError, match="lengths but"):
        length_label_counts([1, 2], [0])


def test_independent_lengths_keep_the_size_rule():
    lengths, labels = _independent(800, 1)
    choice = choose_window(lengths, labels, 16)
    assert choice.window == 12 and not choice.warn
    assert "says little about the label" in choice.message


def test_predictive_lengths_fall_back_to_random_batches():
    lengths, labels = _one_class_longer(800)
    choice = choose_window(lengths, labels, 16)
    assert choice.window == 1
    assert "random batches" in choice.message and "predicts the label" in choice.message


def test_a_rare_class_at_one_end_shrinks_the_window():
    # Eight of 3,200 examples are the longest and have a class of their own: the
    # top band of a 50-batch window is that class, of a few-batch window only a trace.
    rng = random.Random(0)
    lengths = [rng.randint(5, 60) for _ in range(3_192)] + [100] * 8
    labels = [0] * 3_192 + [1] * 8
    choice = choose_window(lengths, labels, 16)
    assert 2 <= choice.window < 50
    per_length = length_label_counts(lengths, labels)
    assert grouped_label_spread(per_length, 16, choice.window) <= LABEL_SPREAD_LIMIT
    assert grouped_label_spread(per_length, 16, choice.window + 1) > LABEL_SPREAD_LIMIT
    assert f"windows of {choice.window} batches instead of 50" in choice.message


def test_configured_window_is_kept_with_a_warning():
    lengths, labels = _one_class_longer(800)
    choice = choose_window(lengths, labels, 16, configured=50)
    assert choice.window == 50 and choice.warn
    assert choose_window(lengths, None, 16).window == 12  # no labels: no check
    assert choose_window(lengths[:100], labels[:100], 16).window == 1


@pytest.mark.parametrize("make", [_independent, _one_class_longer])
def test_chosen_order_is_a_function_of_seed_and_epoch(make):
    lengths, labels = make(800, 3)

    def fresh(epoch: int) -> list[int]:  # what a resumed run rebuilds
        window = choose_window(lengths, labels, 16).window
        sampler = EpochSampler(lengths, 16, seed=5, window=window)
        sampler.set_epoch(epoch)
        return sampler.order()

    assert fresh(1) == fresh(1)
    assert fresh(1) != fresh(0)
    assert sorted(fresh(1)) == list(range(800))


def test_classification_task_logs_and_applies_the_decision(caplog):
    from tunesmith.config.root import Config
    from tunesmith.tasks.base import get_task

    task = get_task(Config.from_dict({"model": {"name_or_path": "m"}, "data": {"train": "t.csv"}}))
    lengths, labels = _one_class_longer(800)
    features = [{"input_ids": [1] * n, "labels": y} for n, y in zip(lengths, labels, strict=True)]
    with caplog.at_level(logging.INFO, logger="tunesmith.tasks.base"):
        sampler = task.train_sampler(features, 16, group_by_length=True, seed=0)
    assert sampler.window == 1 and not sampler.group_by_length
    assert "length grouping off, random batches" in caplog.text
