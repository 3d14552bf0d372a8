"""Dynamic padding and the seeded, length-grouped epoch sampler."""

from __future__ import annotations

import random

import torch

from tunesmith.data.batching import Collator, EpochSampler, window_batches


def test_collator_pads_to_longest_in_batch_only():
    feats = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 1},
        {"input_ids": [8], "attention_mask": [1], "labels": 0},
    ]
    batch = Collator(pad_token_id=9)(feats)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    left = Collator(pad_token_id=9, padding_side="left")(feats)
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]


def test_collator_pads_token_labels_with_ignore_index():
    feats = [{"input_ids": [1, 2], "labels": [3, 4]}, {"input_ids": [1], "labels": [5]}]
    assert Collator(0)(feats)["labels"].tolist() == [[3, 4], [5, -100]]


def _padding_fraction(order, lengths, bs):
    real = padded = 0
    for i in range(0, len(order), bs):
        batch = [lengths[j] for j in order[i : i + bs]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1 - real / padded


def test_length_grouping_cuts_padding_and_keeps_every_index():
    rng = random.Random(0)
    lengths = [rng.randint(5, 60) for _ in range(2000)]
    grouped = EpochSampler(lengths, 16, group_by_length=True, seed=1)
    plain = EpochSampler(lengths, 16, group_by_length=False, seed=1)
    for sampler in (grouped, plain):
        assert sorted(sampler.order()) == list(range(2000))
    assert _padding_fraction(grouped.order(), lengths, 16) < 0.05
    assert _padding_fraction(plain.order(), lengths, 16) > 0.3
    # The longest batch comes first (an out-of-memory run fails at once).
    first = grouped.order()[:16]
    assert max(lengths[i] for i in first) == max(lengths)


def test_sampler_is_seeded_per_epoch():
    lengths = list(range(100))
    a, b = EpochSampler(lengths, 8, seed=3), EpochSampler(lengths, 8, seed=3)
    assert a.order() == b.order()
    first = a.order()
    a.set_epoch(1)
    assert a.order() != first
    assert EpochSampler(lengths, 8, seed=4).order() != first


def test_partial_batch_is_last():
    lengths = [random.Random(i).randint(1, 50) for i in range(50)]
    order = EpochSampler(lengths, 16, seed=0, window=4).order()  # one window: the whole epoch
    assert len(order) == 50
    # Batches 0..2 are full, sorted within; the 2 leftover items come last.
    for start in (0, 16, 32):
        chunk = [lengths[i] for i in order[start : start + 16]]
        assert chunk == sorted(chunk, reverse=True)
    assert torch.tensor(order).unique().numel() == 50


def test_size_rule():
    assert window_batches(10_202, 16) == 50  # the demo's training set: unchanged
    assert window_batches(800, 16) == 12  # four windows of 12 batches, not one of 50
    assert window_batches(4 * 16 * 3, 16) == 3
    assert window_batches(127, 16) == 1  # under 8 batches: random batches
    assert EpochSampler(list(range(800)), 16).window == 12


def test_window_of_one_batch_is_random_batches():
    lengths = [random.Random(i).randint(5, 64) for i in range(500)]
    random_order = EpochSampler(lengths, 16, group_by_length=False, seed=2).order()
    assert EpochSampler(lengths, 16, seed=2, window=1).order() == random_order
    assert (
        EpochSampler(lengths[:100], 16, seed=2).order()
        == EpochSampler(lengths[:100], 16, group_by_length=False, seed=2).order()
    )
