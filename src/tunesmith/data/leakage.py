"""Held-out rows that repeat training rows (leakage), exactly or nearly.

A validation or test row whose input the model has (almost) seen in training
measures memory, not generalisation. Rows are compared on their *input*
(text and text pair, a seq2seq source, a chat's user turns): lowercased,
punctuation removed, whitespace collapsed (``match_key``). Equal keys are
exact repeats; otherwise the Jaccard similarity of the two texts' word sets
decides, from ``data.clean.near_duplicate_threshold`` on.

Single words are the shingles: at the default threshold of 0.9 a one-word
edit of a 20-word text still counts (19/21), which word pairs would miss.

The search is an exact similarity join with a prefix filter (Bayardo et al.,
"Scaling up all pairs similarity search"): with every word set sorted
rarest word first, two sets with Jaccard >= t must share a word among the
first ``n - ceil(t * n) + 1`` words of each. Only training rows sharing such
a word are candidates, and each candidate is verified exactly, so nothing is
missed and nothing depends on hashing luck; at high thresholds the prefixes
are a few rare words and 10,000 x 10,000 rows take about a second.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_PUNCTUATION = re.compile(r"[^\w\s]+")
#: Slack for ``ceil(t * n)``: 0.7 * 10 is 7.000000000000001 in floating point.
_EPS = 1e-9


@dataclass(frozen=True)
class Leak:
    """A held-out row and the most similar training row."""

    source: str
    train_source: str
    similarity: float
    exact: bool

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (similarity rounded to 3 decimals)."""
        return {
            "source": self.source,
            "train_source": self.train_source,
            "similarity": round(self.similarity, 3),
            "exact": self.exact,
        }


def input_text(record: Mapping[str, Any]) -> str:
    """What a row gives the model to answer: text (and pair), or a chat's user turns."""
    if "messages" in record:
        return "\n".join(m["content"] for m in record["messages"] if m["role"] == "user")
    pair = record.get("text_pair")
    return record["text"] if pair is None else f"{record['text']}\n{pair}"


def match_key(text: str) -> str:
    """Lowercased, punctuation removed, whitespace collapsed; the text itself if nothing is left.

    Texts of punctuation or emoji only would all share the empty key; they
    keep their own (lowercased) text instead.
    """
    low = text.lower()
    key = " ".join(_PUNCTUATION.sub("", low).split())
    return key or " ".join(low.split())


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a & b| / |a | b| (0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def _prefix_length(size: int, threshold: float) -> int:
    return size - math.ceil(threshold * size - _EPS) + 1


def find_leaks(
    train: Sequence[Mapping[str, Any]],
    held_out: Sequence[Mapping[str, Any]],
    threshold: float,
) -> list[Leak]:
    """Held-out rows whose input repeats a training row's, with the closest training row.

    Args:
        train: Training records.
        held_out: Validation or test records.
        threshold: Jaccard similarity of the word sets from which a row counts.

    Returns:
        One ``Leak`` per flagged held-out row, in held-out order: the training
        row with the same key (the first such), else the most similar one.
    """
    keys = [match_key(input_text(r)) for r in train]
    first_with_key: dict[str, int] = {}
    for i, key in enumerate(keys):
        first_with_key.setdefault(key, i)
    word_sets = [frozenset(k.split()) for k in keys]
    frequency = Counter(w for s in word_sets for w in s)

    def ordered(words: frozenset[str]) -> list[str]:  # rarest first: short, selective prefixes
        return sorted(words, key=lambda w: (frequency[w], w))

    index: dict[str, list[int]] = defaultdict(list)
    for i, words in enumerate(word_sets):
        for w in ordered(words)[: _prefix_length(len(words), threshold)]:
            index[w].append(i)
    leaks = []
    for record in held_out:
        key = match_key(input_text(record))
        if key in first_with_key:
            train_source = train[first_with_key[key]]["source"]
            leaks.append(Leak(record["source"], train_source, 1.0, exact=True))
            continue
        words = frozenset(key.split())
        best, best_sim = -1, 0.0
        candidates = {
            i for w in ordered(words)[: _prefix_length(len(words), threshold)] for i in index[w]
        }
        for i in sorted(candidates):
            size = len(word_sets[i])
            if not threshold * len(words) - _EPS <= size <= len(words) / threshold + _EPS:
                continue  # Jaccard <= smaller / larger size: cannot reach the threshold
            sim = jaccard(words, word_sets[i])
            if sim >= threshold - _EPS and sim > best_sim:
                best, best_sim = i, sim
        if best >= 0:
            leaks.append(Leak(record["source"], train[best]["source"], best_sim, exact=False))
    return leaks
