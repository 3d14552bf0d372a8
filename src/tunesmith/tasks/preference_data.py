"""Tokenising preference pairs and KTO rows into features, and why rows are dropped.

A pair is rendered three times through the chat template: the prompt alone
(with the generation prompt) and the prompt followed by each reply; the
prompt's tokens are where those token lists agree (as TRL 1.16 finds them:
templates and merges at the boundary can make the prompt alone tokenise
differently), so chosen and rejected share exactly the same prompt tokens and
only reply tokens are scored. A feature holds both sequences and the prompt's
length; ``tasks/preference.py`` concatenates chosen and rejected rows into one
forward.

Rows that cannot train are dropped and counted by reason (a pair with an
empty, blank or identical reply; a prompt that leaves no reply token within
``data.max_length``); ``encode_rows`` raises when nothing is left.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tunesmith.tasks.base import Feature
from tunesmith.tasks.chat_template import render

#: Reasons a row is dropped, as the data report counts them.
IDENTICAL = "chosen and rejected replies are identical"
NO_REPLY = "no reply token within data.max_length"
EMPTY_REPLY = "a reply renders to no token"


@dataclass
class Dropped:
    """Rows dropped while encoding, by reason, with the first row of each."""

    counts: Counter[str] = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, source: str) -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, source)

    def lines(self) -> list[str]:
        """One line per reason: the count and the first row."""
        return [
            f"dropped {n} rows: {reason} (first: {self.first[reason]})"
            for reason, n in self.counts.most_common()
        ]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_and_replies(
    tokenizer: Any, template: str, prompt: list[dict[str, Any]], replies: Sequence[list[dict]]
) -> tuple[int, list[list[int]]]:
    """The shared prompt length and each ``prompt + reply`` token list.

    The prompt is tokenised once (with the generation prompt) and its length
    is cut back to where every full sequence still agrees with it.
    """
    prompt_ids = _ids(tokenizer, render(tokenizer, prompt, template, prompt=True))
    full = [_ids(tokenizer, render(tokenizer, prompt + reply, template)) for reply in replies]
    return min(common_prefix(prompt_ids, ids) for ids in full), full


def pair_feature(
    tokenizer: Any, template: str, record: Mapping[str, Any], limit: int, dropped: Dropped
) -> Feature | None:
    """A pair's feature, or None (counted in ``dropped``) when it cannot train."""
    source = record.get("source", "?")
    if record["chosen"] == record["rejected"]:
        dropped.add(IDENTICAL, source)
        return None
    start, (chosen, rejected) = prompt_and_replies(
        tokenizer, template, record["prompt"], (record["chosen"], record["rejected"])
    )
    if min(len(chosen), len(rejected)) <= start:
        dropped.add(EMPTY_REPLY, source)
        return None
    if chosen == rejected:
        dropped.add(IDENTICAL, source)
        return None
    chosen, rejected = chosen[:limit], rejected[:limit]
    if min(len(chosen), len(rejected)) <= start:
        dropped.add(NO_REPLY, source)
        return None
    return {
        "input_ids": chosen,
        "attention_mask": [1] * len(chosen),
        "rejected_input_ids": rejected,
        "rejected_attention_mask": [1] * len(rejected),
        "prompt_length": start,
    }


def kto_feature(
    tokenizer: Any, template: str, record: Mapping[str, Any], limit: int, dropped: Dropped
) -> Feature | None:
    """A KTO row's feature (prompt + completion, its label), or None when it cannot train."""
    source = record.get("source", "?")
    start, (ids,) = prompt_and_replies(
        tokenizer, template, record["prompt"], (record["completion"],)
    )
    if len(ids) <= start:
        dropped.add(EMPTY_REPLY, source)
        return None
    ids = ids[:limit]
    if len(ids) <= start:
        dropped.add(NO_REPLY, source)
        return None
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "prompt_length": start,
        "desirable": int(bool(record["desirable"])),
    }


def prompt_feature(tokenizer: Any, template: str, record: Mapping[str, Any], limit: int) -> Feature:
    """A prompt to generate a reply for (``predict``): its end is kept."""
    ids = _ids(tokenizer, render(tokenizer, record["messages"], template, prompt=True))[-limit:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def mismatched_rows(features: list[Feature], batch_size: int) -> None:
    """Give each KTO row a mismatched completion for the KL estimate, as TRL 1.16 does.

    Within consecutive chunks of ``batch_size`` rows the completions are
    rotated by one, ``(x1, y1) ... (xn, yn) -> (x1, yn), (x2, y1), ...``, and
    each row keeps its own prompt with the other row's completion
    (``kl_input_ids``). Fixed here, so precomputed reference scores and a
    resumed run see the same pairs whatever order batches come in.
    """
    for start in range(0, len(features), batch_size):
        chunk = features[start : start + batch_size]
        completions = [f["input_ids"][f["prompt_length"] :] for f in chunk]
        rotated = completions[-1:] + completions[:-1]
        for feature, completion in zip(chunk, rotated, strict=True):
            ids = feature["input_ids"][: feature["prompt_length"]] + completion
            feature["kl_input_ids"] = ids
            feature["kl_attention_mask"] = [1] * len(ids)
