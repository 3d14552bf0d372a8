"""Prompt/response rows: a user turn and its reply (``data.prompt_column``, ``response_column``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tunesmith.data.formats.base import Layout, Parts, ReadOptions, blank, text_cell, turn


def pair(source: str, prompt: tuple[str, Any], reply: tuple[str, Any] | None) -> Parts | None:
    """Messages for a ``(column, value)`` prompt and reply (None: unlabelled); None if blank."""
    cells = [(prompt, "user")] + ([(reply, "assistant")] if reply is not None else [])
    messages = []
    for (column, value), role in cells:
        if blank(value):
            return None
        messages.append(turn(role, text_cell(source, f"column {column!r}", value)))
    return {"messages": messages}


def convert(source: str, raw: Mapping[str, Any], opts: ReadOptions) -> Parts | None:
    """The prompt as the user turn, the response as the reply."""
    p, r = opts.prompt_column, opts.response_column
    return pair(source, (p, raw.get(p)), (r, raw.get(r)) if opts.labelled else None)


LAYOUT = Layout(
    "prompt_response",
    indicators=lambda o: [o.prompt_column],
    required=lambda o: (
        {"prompt": o.prompt_column, "response": o.response_column}
        if o.labelled
        else {"prompt": o.prompt_column}
    ),
    convert=convert,
)
