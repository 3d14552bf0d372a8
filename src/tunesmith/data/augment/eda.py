"""EDA word edits (synonym replacement, random insertion, swap, deletion), tag-aware.

Every operation works on a word list with optional BIO tags. With tags, only
``O`` words are replaced, swapped or deleted, inserted words are tagged
``O`` and never land inside an entity (before an ``I-`` word), so an entity
is never split, changed or lost and tags stay aligned with words. Plain text
is split on whitespace; punctuation stuck to a word (``movie,``) stays in
place around its replacement, and a replacement keeps a capital first letter.

The number of words an operation touches is ``rate`` times the eligible
words, drawn unbiased (see ``evaluate.perturb.count_for``) but at least one:
an operation that fires always changes something when it can.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence

from tunesmith.data.augment.synonyms import STOP_WORDS, SynonymSource
from tunesmith.data.perturb import count_for, delete_positions

Words = list[str]
Tags = list[str] | None
Op = Callable[[Words, Tags, float, SynonymSource, random.Random], tuple[Words, Tags]]

_AFFIXES = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


def _split(word: str) -> tuple[str, str, str]:
    """Leading punctuation, the core word, trailing punctuation."""
    m = _AFFIXES.match(word)
    assert m is not None  # the pattern matches any string
    return m.group(1), m.group(2), m.group(3)


def _outside(tags: Tags, n: int) -> list[int]:
    """Positions that may be edited: all without tags, else the ``O`` words."""
    return list(range(n)) if tags is None else [i for i in range(n) if tags[i] == "O"]


def _how_many(rate: float, eligible: int, rng: random.Random) -> int:
    return min(eligible, max(1, count_for(rate, eligible, rng))) if eligible else 0


def _replaceable(word: str, synonyms: SynonymSource) -> list[str]:
    """Synonyms of ``word``'s core, or none for function words and non-words."""
    core = _split(word)[1]
    if not core.isalpha() or core.lower() in STOP_WORDS:
        return []
    return synonyms.synonyms(core.lower())


def _with_core(word: str, new_core: str) -> str:
    lead, core, trail = _split(word)
    if core[:1].isupper():
        new_core = new_core[:1].upper() + new_core[1:]
    return lead + new_core + trail


def synonym_replacement(
    words: Words, tags: Tags, rate: float, synonyms: SynonymSource, rng: random.Random
) -> tuple[Words, Tags]:
    """Replace a ``rate`` share of the replaceable words by one of their synonyms."""
    options = {i: _replaceable(words[i], synonyms) for i in _outside(tags, len(words))}
    eligible = [i for i, syn in options.items() if syn]
    out = list(words)
    for i in rng.sample(eligible, _how_many(rate, len(eligible), rng)):
        out[i] = _with_core(words[i], rng.choice(options[i]))
    return out, tags


def random_insertion(
    words: Words, tags: Tags, rate: float, synonyms: SynonymSource, rng: random.Random
) -> tuple[Words, Tags]:
    """Insert synonyms of random words at random places (``rate`` times the word count)."""
    pool = [s for i in _outside(tags, len(words)) for s in _replaceable(words[i], synonyms)[:5]]
    if not pool:
        return list(words), tags
    out, out_tags = list(words), None if tags is None else list(tags)
    for _ in range(_how_many(rate, len(words), rng)):
        places = [k for k in range(len(out) + 1) if out_tags is None or _may_insert(out_tags, k)]
        k = rng.choice(places)
        out.insert(k, rng.choice(pool))
        if out_tags is not None:
            out_tags.insert(k, "O")
    return out, out_tags


def _may_insert(tags: Sequence[str], k: int) -> bool:
    """Whether a word may go before position ``k`` without splitting an entity."""
    return k == len(tags) or not tags[k].startswith("I-")


def random_swap(
    words: Words, tags: Tags, rate: float, synonyms: SynonymSource, rng: random.Random
) -> tuple[Words, Tags]:
    """Exchange random pairs of words (``rate`` times the eligible words, in swaps)."""
    del synonyms
    eligible = _outside(tags, len(words))
    out = list(words)
    if len(eligible) < 2:
        return out, tags
    for _ in range(_how_many(rate, len(eligible), rng)):
        a, b = rng.sample(eligible, 2)
        out[a], out[b] = out[b], out[a]
    return out, tags  # only O words moved: the tags are unchanged


def random_deletion(
    words: Words, tags: Tags, rate: float, synonyms: SynonymSource, rng: random.Random
) -> tuple[Words, Tags]:
    """Delete a ``rate`` share of the eligible words, never the last one."""
    del synonyms
    eligible = _outside(tags, len(words))
    keep = 1 if len(eligible) == len(words) else 0
    gone = delete_positions(eligible, rate, rng, keep=keep)
    if not gone and len(eligible) > keep:  # a deletion that fires deletes at least one word
        gone = {rng.choice(eligible)}
    out = [w for i, w in enumerate(words) if i not in gone]
    return out, None if tags is None else [t for i, t in enumerate(tags) if i not in gone]


#: The operations by config name.
OPS: dict[str, Op] = {
    "synonym_replacement": synonym_replacement,
    "random_insertion": random_insertion,
    "random_swap": random_swap,
    "random_deletion": random_deletion,
}


def draw_ops(weights: Mapping[str, float], rng: random.Random) -> list[str]:
    """Which operations one copy gets: each by its probability, at least one.

    When none fires, one is drawn in proportion to the probabilities, so a
    copy always has an edit and the mix of operations still follows them.
    """
    fired = [op for op, p in weights.items() if rng.random() < p]
    if not fired:
        fired = rng.choices(list(weights), weights=list(weights.values()))
    return fired


def edit_words(
    words: Words,
    tags: Tags,
    ops: Sequence[str],
    rate: float,
    synonyms: SynonymSource,
    rng: random.Random,
) -> tuple[Words, Tags]:
    """Apply ``ops`` in turn (in the order given) to a word list and its tags."""
    for op in ops:
        words, tags = OPS[op](words, tags, rate, synonyms, rng)
    return words, tags
