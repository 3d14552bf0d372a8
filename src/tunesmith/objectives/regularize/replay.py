"""Replay: mix reference examples into the training stream at a fixed share.

The training set becomes the run's examples followed by the encoded reference
examples (indices ``n ..``); each epoch visits every training example once
plus ``k = round(f / (1 - f) * n)`` reference examples, so a share ``f`` of the
epoch's examples are reference ones. The reference examples are taken in
order from a stream of seeded permutations of the pool, so every one is
replayed before any repeats, across epochs. The epoch's examples are then
ordered (and length-grouped) exactly as without replay.

Like ``EpochSampler``, the order is a function of the seed and the epoch
alone, which is what resuming an interrupted epoch needs.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

from tunesmith.data.batching import EpochSampler


def replay_count(n_train: int, fraction: float) -> int:
    """Reference examples per epoch so that they are ``fraction`` of the epoch."""
    return round(fraction / (1 - fraction) * n_train) if fraction > 0 else 0


class ReplaySampler(Sampler[int]):
    """Every training example plus a seeded share of reference examples, per epoch.

    Args:
        train_lengths: Lengths of the training examples (dataset indices ``0 .. n-1``).
        reference_lengths: Lengths of the reference examples (indices ``n ..``).
        fraction: Share of each epoch's examples that are reference ones, in [0, 1).
        batch_size: Batch size, for length grouping.
        group_by_length: Batch similar lengths together (as ``EpochSampler``).
        seed: The run's seed.
    """

    def __init__(
        self,
        train_lengths: Sequence[int],
        reference_lengths: Sequence[int],
        fraction: float,
        batch_size: int,
        *,
        group_by_length: bool = True,
        seed: int = 0,
    ) -> None:
        self.n_train = len(train_lengths)
        self.pool = len(reference_lengths)
        self.count = replay_count(self.n_train, fraction) if self.pool else 0
        self.lengths = [*train_lengths, *reference_lengths]
        self.batch_size, self.group_by_length, self.seed = batch_size, group_by_length, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_train + self.count

    def __iter__(self) -> Iterator[int]:
        return iter(self.order())

    def replayed(self) -> list[int]:
        """The pool positions of this epoch's reference examples."""
        start, stop = self.epoch * self.count, (self.epoch + 1) * self.count
        out: list[int] = []
        for lap in range(start // self.pool, -(-stop // self.pool)) if self.count else ():
            perm = list(range(self.pool))
            random.Random(self.seed * 7_919 + lap).shuffle(perm)
            lo, hi = max(start - lap * self.pool, 0), min(stop - lap * self.pool, self.pool)
            out.extend(perm[lo:hi])
        return out

    def order(self) -> list[int]:
        """The full dataset-index order of the current epoch."""
        items = [*range(self.n_train), *(self.n_train + r for r in self.replayed())]
        inner = EpochSampler(
            [self.lengths[i] for i in items],
            self.batch_size,
            group_by_length=self.group_by_length,
            seed=self.seed,
        )
        inner.set_epoch(self.epoch)
        return [items[j] for j in inner.order()]
