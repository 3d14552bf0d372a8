"""Seeded input perturbations for the robustness check: typos, case flips, word swaps, deletions.

A model that is right on clean text and wrong on the same text with a typo
serves real users badly; the evaluator reports the metric under each kind of
noise at a few strengths and the drop against clean. ``rate`` is the share of
eligible words changed, drawn so that its expectation is exact even for short
texts (``floor(rate * n + u)`` words, ``u`` uniform), and every chosen word
really changes (a typo never re-draws the same letter). Rate 0 returns the
input unchanged.

Records keep their labels valid: word-labelled data (``words``/``tags``)
only has its tokens edited in place (typos, case) or its ``O`` words moved and
deleted, so an entity is never split or lost and tags stay aligned. Chat
records only have the user's turns perturbed: the reply is the target.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

#: Perturbation kinds, in report order.
KINDS = ("typo", "case", "swap", "delete")
#: Record fields holding input text (classification, seq2seq sources).
TEXT_FIELDS = ("text", "text_pair")

_LETTERS = string.ascii_lowercase


def count_for(rate: float, eligible: int, rng: random.Random) -> int:
    """How many of ``eligible`` items to change so that the expected share is ``rate``."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"perturbation rate must be in [0, 1], got {rate}")
    if rate == 0.0 or eligible == 0:
        return 0
    return min(eligible, int(rate * eligible + rng.random()))


def typo(word: str, rng: random.Random) -> str:
    """One character edit (swap, deletion, insertion or substitution) that changes ``word``."""
    letters = [i for i, c in enumerate(word) if c.isalpha()]
    if not letters:
        return word
    i = rng.choice(letters)
    edits = ["substitute", "insert"]
    if len(word) > 1:
        edits.append("delete")
    if i + 1 < len(word) and word[i + 1] != word[i]:
        edits.append("swap")
    edit = rng.choice(edits)
    if edit == "swap":
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if edit == "delete":
        return word[:i] + word[i + 1 :]
    letter = rng.choice([c for c in _LETTERS if c != word[i].lower()])
    if word[i].isupper():
        letter = letter.upper()
    if edit == "insert":
        return word[:i] + letter + word[i:]
    return word[:i] + letter + word[i + 1 :]


def flip_case(word: str, rng: random.Random) -> str:
    """The word in another case: upper if it has any lower-case letter, else lower."""
    del rng
    return word.upper() if any(c.islower() for c in word) else word.lower()


def _has_letter(word: str) -> bool:
    return any(c.isalpha() for c in word)


def edit_words(
    words: list[str], edit: Callable[[str, random.Random], str], rate: float, rng: random.Random
) -> list[str]:
    """``words`` with a ``rate`` share of those with letters edited in place."""
    eligible = [i for i, w in enumerate(words) if _has_letter(w)]
    chosen = rng.sample(eligible, count_for(rate, len(eligible), rng))
    out = list(words)
    for i in chosen:
        out[i] = edit(out[i], rng)
    return out


def swap_positions(
    positions: Sequence[int], rate: float, rng: random.Random
) -> list[tuple[int, int]]:
    """Disjoint pairs of neighbouring ``positions`` to exchange, moving a ``rate`` share.

    Each swap moves two words, so ``rate * n / 2`` swaps are drawn (unbiased,
    as in ``count_for``); neighbours are taken in ``positions`` order.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"perturbation rate must be in [0, 1], got {rate}")
    wanted = min(len(positions) // 2, int(rate * len(positions) / 2 + rng.random())) if rate else 0
    pairs = [(positions[k], positions[k + 1]) for k in range(len(positions) - 1)]
    rng.shuffle(pairs)
    used: set[int] = set()
    chosen: list[tuple[int, int]] = []
    for a, b in pairs:
        if len(chosen) == wanted:
            break
        if a not in used and b not in used:
            chosen.append((a, b))
            used.update((a, b))
    return chosen


def delete_positions(
    positions: Sequence[int], rate: float, rng: random.Random, keep: int = 1
) -> set[int]:
    """A ``rate`` share of ``positions`` to delete, leaving at least ``keep`` words overall."""
    count = min(count_for(rate, len(positions), rng), max(0, len(positions) - keep))
    return set(rng.sample(list(positions), count))


def perturb_words(words: list[str], kind: str, rate: float, rng: random.Random) -> list[str]:
    """``words`` with one kind of noise at ``rate``."""
    if kind == "typo":
        return edit_words(words, typo, rate, rng)
    if kind == "case":
        return edit_words(words, flip_case, rate, rng)
    if kind == "swap":
        out = list(words)
        for a, b in swap_positions(range(len(words)), rate, rng):
            out[a], out[b] = out[b], out[a]
        return out
    if kind == "delete":
        gone = delete_positions(range(len(words)), rate, rng)
        return [w for i, w in enumerate(words) if i not in gone]
    raise ValueError(f"unknown perturbation {kind!r}; known: {', '.join(KINDS)}")


def perturb_text(text: str, kind: str, rate: float, rng: random.Random) -> str:
    """``text`` with one kind of noise at ``rate`` (words split on whitespace)."""
    if rate == 0.0:
        return text
    return " ".join(perturb_words(text.split(), kind, rate, rng))


def perturb_tagged(
    tokens: list[str], tags: list[str] | None, kind: str, rate: float, rng: random.Random
) -> tuple[list[str], list[str] | None]:
    """Word-labelled data with tags kept aligned: only ``O`` words move or disappear."""
    if rate == 0.0:
        return list(tokens), None if tags is None else list(tags)
    if kind in ("typo", "case"):
        return perturb_words(tokens, kind, rate, rng), None if tags is None else list(tags)
    outside = [i for i in range(len(tokens)) if tags is None or tags[i] == "O"]
    order = list(range(len(tokens)))
    if kind == "swap":
        for a, b in swap_positions(outside, rate, rng):
            order[a], order[b] = order[b], order[a]
    elif kind == "delete":
        gone = delete_positions(outside, rate, rng, keep=1 if len(outside) == len(tokens) else 0)
        order = [i for i in order if i not in gone]
    else:
        raise ValueError(f"unknown perturbation {kind!r}; known: {', '.join(KINDS)}")
    return [tokens[i] for i in order], None if tags is None else [tags[i] for i in order]


def perturb_record(
    record: Mapping[str, Any], kind: str, rate: float, rng: random.Random
) -> dict[str, Any]:
    """A copy of ``record`` with its input perturbed and its label still valid."""
    out = dict(record)
    if isinstance(out.get("words"), list):  # word-tagged records (data/tagged.py)
        out["words"], tags = perturb_tagged(out["words"], out.get("tags"), kind, rate, rng)
        out["text"] = " ".join(out["words"])
        if tags is not None:
            out["tags"] = tags
        return out
    for field in TEXT_FIELDS:
        if isinstance(out.get(field), str):
            out[field] = perturb_text(out[field], kind, rate, rng)
    if isinstance(out.get("messages"), list):
        out["messages"] = [
            {**m, "content": perturb_text(m["content"], kind, rate, rng)}
            if m.get("role") == "user"
            else m
            for m in out["messages"]
        ]
    return out


def perturb_records(
    records: Sequence[Mapping[str, Any]], kind: str, rate: float, seed: int
) -> list[dict[str, Any]]:
    """Every record perturbed, seeded per (kind, rate, seed): the same call gives the same text."""
    rng = random.Random(f"{seed}:{kind}:{rate}")
    return [perturb_record(r, kind, rate, rng) for r in records]
