"""Robustness perturbations: seeded, at the requested rate, labels and tags kept valid."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunesmith.data.perturb import (
    KINDS,
    perturb_record,
    perturb_records,
    perturb_tagged,
    perturb_text,
    typo,
)

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
WORDS += ["while", "seven", "tired", "cats", "watch", "it"]


def sentence(rng: random.Random, n: int = 20) -> str:
    return " ".join(rng.choice(WORDS) + str(i) for i in range(n))  # distinct words


@pytest.mark.parametrize("kind", KINDS)
def test_rate_zero_leaves_text_unchanged(kind: str) -> None:
    text = "An  odd   text, with Spacing and CAPS."
    assert perturb_text(text, kind, 0.0, random.Random(0)) == text
    records = [{"text": text, "label": "pos"}]
    assert perturb_records(records, kind, 0.0, seed=3) == records


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_same_seed_same_text_other_seed_other_text(kind: str) -> None:
    rng = random.Random(1)
    records = [{"text": sentence(rng), "label": "pos"} for _ in range(30)]
    a = perturb_records(records, kind, 0.3, seed=7)
    assert a == perturb_records(records, kind, 0.3, seed=7)
    assert a != perturb_records(records, kind, 0.3, seed=8)
    assert all(r["label"] == "pos" for r in a)
    assert records[0]["text"] != a[0]["text"] or records[1]["text"] != a[1]["text"]


def changed_share(kind: str, rate: float) -> float:
    """Share of words changed, measured the way each kind changes them."""
    rng = random.Random(11)
    changed = total = 0
    for _ in range(300):
        words = sentence(rng).split()
        out = perturb_text(" ".join(words), kind, rate, rng).split()
        total += len(words)
        if kind == "delete":
            changed += len(words) - len(out)
        else:
            changed += sum(a != b for a, b in zip(words, out, strict=True))
    return changed / total


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_changes_words_at_the_requested_rate(kind: str, rate: float) -> None:
    assert changed_share(kind, rate) == pytest.approx(rate, abs=0.02)


def test_typo_always_changes_a_word_with_letters() -> None:
    rng = random.Random(0)
    for word in ["a", "ab", "aa", "Hello", "x1", "book"]:
        for _ in range(50):
            assert typo(word, rng) != word
    assert typo("123", rng) == "123"


def test_chat_records_only_perturb_user_turns() -> None:
    record = {
        "messages": [
            {"role": "system", "content": "be brief and kind"},
            {"role": "user", "content": "what is the capital of france please"},
            {"role": "assistant", "content": "paris is the capital"},
        ]
    }
    out = perturb_records([record], "delete", 0.5, seed=0)[0]["messages"]
    assert out[0] == record["messages"][0] and out[2] == record["messages"][2]
    assert out[1]["content"] != record["messages"][1]["content"]


TAGS = ["O", "B-PER", "I-PER", "B-LOC"]


@st.composite
def tagged(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    n = draw(st.integers(1, 25))
    tokens = draw(st.lists(st.text("abcXYZ", min_size=1, max_size=6), min_size=n, max_size=n))
    tags = draw(st.lists(st.sampled_from(TAGS), min_size=n, max_size=n))
    return tokens, tags


@settings(max_examples=150, deadline=None)
@given(
    data=tagged(),
    kind=st.sampled_from(KINDS),
    rate=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    seed=st.integers(0, 10_000),
)
def test_tagged_perturbations_keep_tags_aligned_and_entities_whole(
    data: tuple[list[str], list[str]], kind: str, rate: float, seed: int
) -> None:
    tokens, tags = data
    new_tokens, new_tags = perturb_tagged(tokens, tags, kind, rate, random.Random(seed))
    assert new_tags is not None and len(new_tokens) == len(new_tags) >= 1
    entities = [(t, g) for t, g in zip(tokens, tags, strict=True) if g != "O"]
    kept = [(t, g) for t, g in zip(new_tokens, new_tags, strict=True) if g != "O"]
    if kind in ("swap", "delete"):
        # Entity words are neither moved relative to each other nor lost.
        assert kept == entities
    else:
        assert new_tags == tags and [g for _, g in kept] == [g for _, g in entities]


def test_unknown_kind_and_bad_rate_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb_text("a b c", "shout", 0.5, random.Random(0))
    with pytest.raises(ValueError, match="rate"):
        perturb_text("a b c", "typo", 1.5, random.Random(0))


def test_word_tagged_records_have_their_words_perturbed() -> None:
    words = ["John", "Smith", "went", "to", "the", "big", "old", "market", "in", "Paris"]
    tags = ["B-PER", "I-PER", "O", "O", "O", "O", "O", "O", "O", "B-LOC"]
    record = {"text": " ".join(words), "words": words, "tags": tags, "source": "f:1"}
    out = perturb_record(record, "delete", 0.5, random.Random(0))
    assert len(out["words"]) < len(words) and len(out["words"]) == len(out["tags"])
    assert out["text"] == " ".join(out["words"])
    assert out["words"][:2] == ["John", "Smith"] and out["words"][-1] == "Paris"
