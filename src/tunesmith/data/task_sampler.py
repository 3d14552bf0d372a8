"""Task sampling for multi-task training: which task each training batch comes from.

Every batch holds examples of one task only (the tasks' labels have different
shapes, and each batch goes through one head). How often each task gets a
batch is its *mixing rate* ``p_t``, from the number of training examples
``n_t`` of each task:

* ``proportional``: ``p_t ∝ n_t`` (every example is seen about once an epoch);
* ``uniform``: ``p_t = 1 / tasks`` (small tasks are over-sampled);
* ``temperature``: ``p_t ∝ n_t^(1/T)``: T = 1 is proportional, large T
  approaches uniform (T = 2 is a common compromise).

An epoch has ``ceil(total examples / batch_size)`` batches, so its length does
not depend on the sampling. Rather than flipping a coin per batch, each task
gets a fixed quota of the epoch's batches (``p_t`` times the batch count,
rounded by largest remainder) and the quotas are shuffled together: the mixing
rates then hold exactly in every epoch instead of only on average, and the
order is still random.

A task's batches are cut from an endless stream of its examples: seeded
shuffles (length-grouped like ``EpochSampler`` when asked) laid end to end.
An over-sampled task cycles through its examples; an under-sampled one
continues next epoch where it stopped, so over the epochs every example is
used. Epoch ``e`` of task ``t`` takes the stream from ``e * quota_t *
batch_size`` on: the order is a function of the seed and the epoch alone,
which is what resuming relies on (``EpochSampler`` has the same property).
Every batch is full, so the DataLoader's ``batch_size`` cuts the order into
exactly these batches (also when accelerate shards them over processes).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

from tunesmith.data.batching import EpochSampler

#: Accepted ``multitask.sampling`` values.
SAMPLING = ("proportional", "uniform", "temperature")


def mixing_rates(sizes: Sequence[int], sampling: str, temperature: float = 2.0) -> list[float]:
    """The share of batches each task gets (sums to 1).

    Args:
        sizes: Training examples per task (tasks without any get 0).
        sampling: ``proportional`` | ``uniform`` | ``temperature``.
        temperature: ``T`` of ``p_t ∝ n_t^(1/T)`` (only for ``temperature``).

    Raises:
        ValueError: An unknown sampling, a temperature <= 0 or no examples at all.
    """
    if sampling not in SAMPLING:
        raise ValueError(f"unknown sampling {sampling!r} (one of: {', '.join(SAMPLING)})")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    if not any(n > 0 for n in sizes):
        raise ValueError("no task has training examples")
    power = {"proportional": 1.0, "uniform": 0.0, "temperature": 1.0 / temperature}[sampling]
    weights = [float(n) ** power if n > 0 else 0.0 for n in sizes]
    total = sum(weights)
    return [w / total for w in weights]


def batch_quotas(rates: Sequence[float], batches: int) -> list[int]:
    """Batches per task: ``rates * batches`` rounded so they sum to ``batches``.

    Largest remainder: each task gets the floor of its share, the batches
    left over go to the largest fractional parts (ties: the earlier task).
    """
    shares = [r * batches for r in rates]
    quotas = [math.floor(s) for s in shares]
    left = batches - sum(quotas)
    by_remainder = sorted(range(len(rates)), key=lambda t: (-(shares[t] - quotas[t]), t))
    for t in by_remainder[:left]:
        quotas[t] += 1
    return quotas


class TaskBatchSampler(Sampler[int]):
    """Seeded per-epoch order of single-task, full batches mixed at the given rates.

    Args:
        task_ids: The task of every training example (0 .. tasks - 1).
        lengths: Token length of every example (for length grouping).
        batch_size: Examples per batch (the DataLoader's ``batch_size``).
        rates: Mixing rate per task (``mixing_rates``).
        group_by_length: Group similar lengths into a batch within each task.
        seed: The run's seed.

    ``lengths`` and ``order()`` are what ``EpochSampler`` offers too, so the
    estimate and the loop treat both alike.
    """

    def __init__(
        self,
        task_ids: Sequence[int],
        lengths: Sequence[int],
        batch_size: int,
        *,
        rates: Sequence[float],
        group_by_length: bool = True,
        seed: int = 0,
    ) -> None:
        if len(task_ids) != len(lengths):
            raise ValueError("task_ids and lengths differ in length")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.members: list[list[int]] = [[] for _ in rates]
        for index, task in enumerate(task_ids):
            self.members[task].append(index)
        rates = [r if self.members[t] else 0.0 for t, r in enumerate(rates)]
        total = sum(rates)
        if total <= 0:
            raise ValueError("no task with a positive rate has training examples")
        self.rates = [r / total for r in rates]
        self.batches_per_epoch = max(1, math.ceil(len(self.lengths) / batch_size))
        self.quotas = batch_quotas(self.rates, self.batches_per_epoch)
        # One length-grouped shuffler per task; its "epoch" is the pass over that task.
        self._passes = [
            EpochSampler(
                [self.lengths[i] for i in members],
                batch_size,
                group_by_length=group_by_length,
                seed=seed * 1_009 + t + 1,
            )
            for t, members in enumerate(self.members)
        ]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def __iter__(self) -> Iterator[int]:
        return iter(self.order())

    def order(self) -> list[int]:
        """The full index order of the current epoch (consecutive full batches)."""
        return [i for batch in self.batches() for i in batch]

    def batches(self) -> list[list[int]]:
        """The current epoch's batches; the one with the longest example first.

        Longest first, as in ``EpochSampler``: a batch that does not fit in
        memory fails at the first step, not hours in.
        """
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        schedule = [t for t, quota in enumerate(self.quotas) for _ in range(quota)]
        rng.shuffle(schedule)
        pending = {
            t: iter(self._task_batches(t, self.epoch * quota, quota))
            for t, quota in enumerate(self.quotas)
            if quota
        }
        batches = [next(pending[t]) for t in schedule]
        longest = max(range(len(batches)), key=lambda k: max(self.lengths[i] for i in batches[k]))
        batches[0], batches[longest] = batches[longest], batches[0]
        return batches

    def task_of_batches(self) -> list[int]:
        """The task of each batch of the current epoch, in order (for reports and tests)."""
        task_of = {i: t for t, members in enumerate(self.members) for i in members}
        return [task_of[batch[0]] for batch in self.batches()]

    def _task_batches(self, task: int, first: int, count: int) -> list[list[int]]:
        """Batches ``first .. first + count - 1`` of the task's endless stream of passes."""
        members, size = self.members[task], self.batch_size
        start, end = first * size, (first + count) * size
        stream: list[int] = []
        sampler = self._passes[task]
        for n in range(start // len(members), (end - 1) // len(members) + 1):
            sampler.set_epoch(n)
            stream.extend(members[i] for i in sampler.order())
        offset = start - (start // len(members)) * len(members)
        stream = stream[offset : offset + end - start]
        return [stream[k : k + size] for k in range(0, len(stream), size)]
