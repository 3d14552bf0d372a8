"""Does text length predict the label? The statistic behind length grouping's label check.

Length grouping sorts a window of ``k`` batches' worth of examples by length
and cuts it into batches, so each batch holds one of ``k`` bands of lengths.
Where length goes with the label (one class is wordier than the others), a
band's label mix differs from the epoch's, and so does every batch cut from
it: each step then leans towards the classes of one length. A random batch's
label mix varies as well (it is a sample), so the question is not whether a
grouped batch is skewed but how much more than a random one.

That ratio has a closed form. Let ``p_c`` be the share of class ``c`` in the
epoch and ``q_bc`` its share in length band ``b`` (bands of equal size). A
random batch of ``m`` examples has label counts whose chi-square against
``p`` averages ``C - 1`` (``C`` classes); a batch drawn from band ``b`` adds
``(m - 1) * sum_c (q_bc - p_c)^2 / p_c`` on average, and averaged over the
bands that sum is ``phi^2``, the chi-square of the band-by-label table
divided by the number of examples. So grouped batches' label mix varies

    ratio = 1 + (m - 1) * phi^2 / (C - 1)

times as much as random batches' do: a grouped batch of ``m`` is as
unbalanced in labels as a random batch of ``m / ratio``. The statistic is
cheap (one pass to count, then a table of lengths by labels), deterministic
(no sampling: examples tied in length are split across bands in proportion,
which is what the sampler's random tie-break does on average) and depends on
the window, so it can choose one rather than only say yes or no. The sample
``phi^2`` is biased upwards by about its degrees of freedom over ``n`` even
where length and label are independent; that much is subtracted.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence


def length_label_counts(
    lengths: Sequence[int], labels: Sequence[Hashable]
) -> list[Counter[Hashable]]:
    """The label counts of each distinct length, shortest length first."""
    if len(lengths) != len(labels):
        raise ValueError(f"{len(lengths)} lengths but {len(labels)} labels")
    by_length: dict[int, Counter[Hashable]] = defaultdict(Counter)
    for length, label in zip(lengths, labels, strict=True):
        by_length[length][label] += 1
    return [by_length[length] for length in sorted(by_length)]


def band_label_counts(
    per_length: Sequence[Counter[Hashable]], bands: int
) -> list[dict[Hashable, float]]:
    """Expected label counts of ``bands`` equal-size length bands.

    Args:
        per_length: ``length_label_counts`` of the examples.
        bands: How many bands the length order is cut into (batches per window).

    A run of examples of one length that straddles band edges is shared among
    those bands in proportion to the overlap, labels alike, as a random
    tie-break would share it on average.
    """
    n = sum(sum(counts.values()) for counts in per_length)
    table: list[dict[Hashable, float]] = [defaultdict(float) for _ in range(bands)]
    start = 0
    for counts in per_length:
        size = sum(counts.values())
        stop = start + size
        for band in range(start * bands // n, min(bands, -(-stop * bands // n))):
            overlap = min(stop, (band + 1) * n / bands) - max(start, band * n / bands)
            if overlap > 0:
                for label, count in counts.items():
                    table[band][label] += count * overlap / size
        start = stop
    return table


def grouped_label_spread(
    per_length: Sequence[Counter[Hashable]], batch_size: int, bands: int
) -> float:
    """How many times more the label mix of length-grouped batches varies than random ones'.

    Args:
        per_length: ``length_label_counts`` of the training examples.
        batch_size: Examples per batch.
        bands: Batches per sorting window (each batch then holds one length band).

    Returns:
        1.0 where length says nothing about the label (or ``bands`` is 1, or
        there is one class); ``r`` means a grouped batch is as unbalanced in
        labels as a random batch of ``batch_size / r`` examples.
    """
    total: Counter[Hashable] = Counter()
    for counts in per_length:
        total.update(counts)
    n, classes = sum(total.values()), len(total)
    if bands < 2 or classes < 2 or n == 0:
        return 1.0
    expected = {label: count / bands for label, count in total.items()}
    chi2 = sum(
        (band[label] - want) ** 2 / want
        for band in band_label_counts(per_length, bands)
        for label, want in expected.items()
    )
    # Bands beyond the number of distinct lengths only split ties: no new freedom.
    freedom = (min(bands, len(per_length)) - 1) * (classes - 1)
    phi2 = max(0.0, chi2 - freedom) / n
    return 1.0 + (batch_size - 1) * phi2 / (classes - 1)
