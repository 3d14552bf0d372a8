"""Dynamic padding and the epoch sampler (random or length-grouped).

Padding every batch to ``max_length`` wastes most of the compute on short
texts; padding to the longest item of each batch is better, and grouping
similar lengths into the same batch removes most of what remains (Rotten
Tomatoes reviews: random batches of 16 carry ~44% padding).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

#: Pad values by feature name; features not listed pad with 0. -100 marks "no value"
#: where 0 is a real one (label ids, word indices, character offsets).
#: Label of a position that no loss reads (prompt tokens, padding, word pieces after
#: the first): the ``ignore_index`` of every cross-entropy in the package.
IGNORE = -100

PAD_VALUES = {
    "labels": -100,
    "attention_mask": 0,
    "token_type_ids": 0,
    "word_ids": -100,
    "word_labels": -100,
    "char_start": -100,
    "char_end": -100,
}


class FeatureDataset(Dataset):
    """A list of pre-tokenised features; each item also carries its own index."""

    def __init__(self, features: Sequence[dict[str, Any]]) -> None:
        self.features = list(features)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.features[i], "index": i}


class Collator:
    """Pads a list of features to the batch's longest sequence.

    Args:
        pad_token_id: Value for padded ``input_ids``.
        padding_side: ``"right"`` (encoders) or ``"left"`` (decoders generating).
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for key in features[0]:
            values = [f[key] for f in features]
            if isinstance(values[0], (list, tuple)):
                pad = self.pad_token_id if key == "input_ids" else PAD_VALUES.get(key, 0)
                batch[key] = self._pad(values, pad)
            else:
                batch[key] = torch.tensor(values)
        return batch

    def _pad(self, rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        # Float rows (multi-hot or regression targets) stay float; ids are long.
        floats = any(isinstance(x, float) for r in rows[:1] for x in r)
        out = torch.full((len(rows), width), value, dtype=torch.float if floats else torch.long)
        for i, row in enumerate(rows):
            if not row:
                continue
            if self.padding_side == "left":
                out[i, width - len(row) :] = torch.as_tensor(row)
            else:
                out[i, : len(row)] = torch.as_tensor(row)
        return out


#: Most batches sorted together. The padding saved grows slowly beyond this:
#: on the demo reviews (batch 16) windows of 12, 25 and 50 batches remove 81%,
#: 91% and 95% of random batches' padding.
MAX_WINDOW_BATCHES = 50
#: Fewest windows per epoch. With one window covering the epoch, an example's
#: batch-mates are the same length-neighbours every epoch; with four they come
#: from a random quarter of the data each time. Four rather than more because
#: the padding saved depends on the batches per window alone: 800 demo reviews
#: in four windows of 12 batches keep 84% of the saving of one 50-batch window,
#: in eight windows of 6 batches 70%.
MIN_WINDOWS = 4


def window_batches(examples: int, batch_size: int) -> int:
    """Batches per sorting window for an epoch of ``examples``: the size rule.

    At most ``MAX_WINDOW_BATCHES`` and at most a ``MIN_WINDOWS``-th of the
    epoch; 1 (random batches) where the epoch has fewer than
    ``2 * MIN_WINDOWS`` batches, too few to group without fixing them.
    """
    return max(1, min(MAX_WINDOW_BATCHES, examples // (MIN_WINDOWS * batch_size)))


class EpochSampler(Sampler[int]):
    """Seeded per-epoch order; optionally groups similar lengths into batches.

    With ``group_by_length`` the epoch's permutation is cut into windows of
    ``window * batch_size`` items, each sorted by length and cut into batches,
    and the batch order is then shuffled, so batches stay random but nearly
    padding-free. The longest batch is placed first so that a run that does
    not fit in memory fails at once instead of hours in. A window of one batch
    is random batches (the order ``group_by_length=False`` gives).

    The order depends only on ``seed`` and the epoch set by ``set_epoch``, so a
    run is reproducible and a resumed run can skip to its position.

    Args:
        lengths: Token length of every example.
        batch_size: Examples per batch.
        group_by_length: Sort windows by length (False: random batches).
        seed: The run's seed.
        window: Batches per sorting window; None: ``window_batches`` of the data size.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        group_by_length: bool = True,
        seed: int = 0,
        window: int | None = None,
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.window = window_batches(len(self.lengths), batch_size) if window is None else window
        if self.window < 1:
            raise ValueError(f"window must be at least 1 batch, got {self.window}")
        self.group_by_length = group_by_length and self.window > 1
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order())

    def order(self) -> list[int]:
        """The full index order of the current epoch."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        perm = list(range(len(self.lengths)))
        rng.shuffle(perm)
        if not self.group_by_length:
            return perm
        mega = self.batch_size * self.window
        batches: list[list[int]] = []
        for start in range(0, len(perm), mega):
            chunk = sorted(perm[start : start + mega], key=lambda i: -self.lengths[i])
            batches.extend(
                chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)
            )
        # Keep a partial batch last so batch boundaries line up with DataLoader's.
        full = [b for b in batches if len(b) == self.batch_size]
        partial = [b for b in batches if len(b) != self.batch_size]
        rng.shuffle(full)
        if full:
            longest = max(range(len(full)), key=lambda k: max(self.lengths[i] for i in full[k]))
            full[0], full[longest] = full[longest], full[0]
        return [i for b in full + partial for i in b]


def padded_tokens(order: Sequence[int], lengths: Sequence[int], batch_size: int) -> int:
    """Tokens, pads included, of the batches ``order`` cuts into (each padded to its longest)."""
    batches = (order[i : i + batch_size] for i in range(0, len(order), batch_size))
    return sum(len(b) * max(lengths[j] for j in b) for b in batches)


def length_sorted_order(lengths: Sequence[int]) -> list[int]:
    """Indices sorted longest first: evaluation order with the least padding."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])
