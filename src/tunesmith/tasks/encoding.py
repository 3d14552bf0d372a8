"""Tokenisation helpers shared by the tasks.

Every task tokenises in chunks (one fast-tokenizer call per chunk instead of
per record) and must respect both ``data.max_length`` and the model's
position table, whichever is smaller.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from tunesmith.errors import ModelError

T = TypeVar("T")

#: Records per tokenizer call: large enough to amortise the call, small enough for memory.
TOKENIZE_CHUNK = 1024


def chunks(items: Sequence[T], size: int = TOKENIZE_CHUNK) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items`` of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def full_lengths(
    tokenizer: Any,
    texts: Sequence[Any],
    pairs: Sequence[Any] | None = None,
    *,
    target: bool = False,
    **options: Any,
) -> list[int]:
    """Token counts of ``texts`` (and ``pairs``) without truncation, in chunks.

    What ``encode`` would cut is what lies beyond the limit (``data inspect``).
    ``target`` tokenises them as decoder targets; ``options`` go to the tokenizer.
    """
    lengths: list[int] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        part = list(texts[start : start + TOKENIZE_CHUNK])
        if target:
            enc = tokenizer(text_target=part, verbose=False, **options)
        else:
            pair = None if pairs is None else list(pairs[start : start + TOKENIZE_CHUNK])
            enc = tokenizer(part, pair, verbose=False, **options)
        lengths += [len(ids) for ids in enc["input_ids"]]
    return lengths


def effective_limit(tokenizer: Any, max_length: int) -> int:
    """The length inputs are cut to: ``max_length``, or the model's positions if fewer."""
    return position_cut(tokenizer, max_length) or max_length


def position_cut(tokenizer: Any, max_length: int) -> int | None:
    """The model's position limit when it is below ``max_length``, else None.

    ``load_tokenizer`` sets the tokenizer's ``model_max_length`` to the model's
    position table, so a longer ``data.max_length`` would yield inputs the
    model cannot embed.
    """
    positions = getattr(tokenizer, "model_max_length", None)
    return positions if isinstance(positions, int) and 0 < positions < max_length else None


def require_fast_tokenizer(tokenizer: Any, task: str, needs: str) -> None:
    """Refuse a slow (pure Python) tokenizer for tasks that need its alignment data.

    Raises:
        ModelError: Naming the tokenizer's folder and what the task needs.
    """
    if not getattr(tokenizer, "is_fast", False):
        where = getattr(tokenizer, "name_or_path", "") or "the model folder"
        raise ModelError(
            f"{where}: task.type {task} needs a fast tokenizer ({needs}), but "
            f"{type(tokenizer).__name__} is a slow one; save a fast tokenizer into the model "
            "folder (AutoTokenizer.from_pretrained(folder, use_fast=True).save_pretrained"
            "(folder) writes tokenizer.json)"
        )
