"""How training batches are grouped by length: the window decision and its log line.

The sampler (``data/batching.py``) sorts windows of a given number of batches
by length; this module chooses that number for a run. The data size bounds it
(``window_batches``); where the task has one class per example, the label
check (``data/length_labels.py``) then shrinks it while length-sorted batches
would be much more unbalanced in labels than random ones, down to random
batches. A window set in the config is kept, with a warning where the check
would have shrunk it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from tunesmith.data.batching import MIN_WINDOWS, window_batches
from tunesmith.data.length_labels import grouped_label_spread, length_label_counts

log = logging.getLogger(__name__)

#: Most a length-grouped batch's label mix may vary, relative to a random batch's.
#: 1.25 keeps a grouped batch of 16 as balanced in labels as a random batch of
#: 13, a difference of batch size runs are not tuned that finely for. The demo
#: reviews' sentiment measures 1.00 (length says nothing of it), their lengths
#: with shuffled labels 1.00 to 1.10, and a class twice as long as the two
#: others (the benchmark's constructed set) 3.2 to 4.6.
LABEL_SPREAD_LIMIT = 1.25


@dataclass(frozen=True)
class WindowChoice:
    """The window a run's sampler uses, and why.

    Attributes:
        window: Batches per sorting window; 1 is random batches.
        message: The one log line that says what was decided and why.
        warn: Whether that line is a warning (a configured window the check disputes).
    """

    window: int
    message: str
    warn: bool = False


def choose_window(
    lengths: Sequence[int],
    labels: Sequence[Hashable] | None,
    batch_size: int,
    configured: int | None = None,
) -> WindowChoice:
    """The sorting window for length-grouped batches of this training set.

    Args:
        lengths: Token length of every training example.
        labels: Class of every example, for the label check; None skips it
            (tasks without one class per example).
        batch_size: Examples per batch.
        configured: ``data.length_window``; None chooses.

    The order the sampler draws from this window is still a function of the
    seed and the epoch alone: the choice depends on the training set only, so a
    resumed run makes the same one.
    """
    size = configured or window_batches(len(lengths), batch_size)
    if size < 2:
        why = "data.length_window is 1" if configured else _too_few(len(lengths), batch_size)
        return WindowChoice(1, f"length grouping off, random batches: {why}")
    chosen = f"length grouping: windows of {size} batches{_source(configured)}"
    if labels is None:
        return WindowChoice(size, chosen)
    per_length = length_label_counts(lengths, labels)
    spread = grouped_label_spread(per_length, batch_size, size)
    if spread <= LABEL_SPREAD_LIMIT:
        return WindowChoice(
            size,
            f"{chosen}; text length says little about the label "
            f"({_spread(spread, batch_size, 'are')})",
        )
    if configured is not None:
        return WindowChoice(
            size,
            f"length grouping: windows of {size} batches (data.length_window) although text "
            f"length predicts the label ({_spread(spread, batch_size, 'are')}); null lets the "
            "run choose",
            warn=True,
        )
    window = _widest_balanced(per_length, batch_size, size)
    narrowest = grouped_label_spread(per_length, batch_size, max(window, 2))
    why = f"in {size}-batch windows, {_spread(spread, batch_size, 'would be')}"
    if window == 1:
        still = f"; in 2-batch windows still {narrowest:.2f}x" if size > 2 else ""
        return WindowChoice(
            1, f"length grouping off, random batches: text length predicts the label ({why}{still})"
        )
    return WindowChoice(
        window,
        f"length grouping: windows of {window} batches instead of {size}: text length "
        f"predicts the label ({why}; in {window}-batch windows {narrowest:.2f}x)",
    )


def _widest_balanced(per_length: Sequence[Counter[Hashable]], batch_size: int, below: int) -> int:
    """The largest window under ``below`` batches within the spread limit (1: none is)."""
    for window in range(below - 1, 1, -1):
        if grouped_label_spread(per_length, batch_size, window) <= LABEL_SPREAD_LIMIT:
            return window
    return 1


def _spread(spread: float, batch_size: int, verb: str) -> str:
    """The label spread as a reader can weigh it: the random batch size it equals."""
    return (
        f"length-sorted batches of {batch_size} {verb} as unbalanced in labels as random "
        f"batches of {batch_size / spread:.1f}: label-mix spread {spread:.2f}x, limit "
        f"{LABEL_SPREAD_LIMIT}x"
    )


def _too_few(examples: int, batch_size: int) -> str:
    return (
        f"{examples} examples fill fewer than {2 * MIN_WINDOWS} batches of {batch_size}, too "
        "few to sort in windows"
    )


def _source(configured: int | None) -> str:
    return " (data.length_window)" if configured is not None else ""
