"""The rows of an RL run: a prompt (text or chat messages) and the columns rewards read.

RL data has no replies: the model writes them during training. A row holds
its prompt in ``data.prompt_column`` (a string, one user turn, or a list of
``{role, content}`` messages ending with a user turn) and anything else the
rewards need (the ``answer`` column of a verifiable task); every other column
reaches the rewards as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tunesmith.data.chat import chat_record
from tunesmith.data.formats.base import blank, text_cell, turn
from tunesmith.data.loading import read_rows
from tunesmith.errors import DataError


def read_prompt_rows(
    path: str, prompt_column: str, system_prompt: str | None, dropped: list[str] | None
) -> list[dict[str, Any]]:
    """Records of ``path``: ``messages`` (the prompt), ``columns`` (the rest), ``source``.

    Args:
        path: The data file.
        prompt_column: The column holding the prompt.
        system_prompt: ``task.system_prompt``, put first when a prompt has none.
        dropped: Collects the sources of rows with an empty prompt (None: fail on them).

    Raises:
        DataError: No prompt column, a prompt that is neither text nor messages,
            or an empty prompt while ``dropped`` is None.
    """
    columns, rows = read_rows(path)
    if prompt_column not in columns:
        raise DataError(
            f"{path}: RL rows need a {prompt_column!r} column (text or messages; set "
            f"data.prompt_column); columns: {', '.join(columns) or 'none'}"
        )
    records = []
    for source, raw in rows:
        value = raw.get(prompt_column)
        if blank(value) or value == []:
            if dropped is None:
                raise DataError(f"{source}: empty {prompt_column!r}")
            dropped.append(source)
            continue
        messages = _messages(source, prompt_column, value)
        extra = {k: v for k, v in raw.items() if k != prompt_column}
        records.append(
            chat_record(
                messages, source, labelled=False, system_prompt=system_prompt, columns=extra
            )
        )
    return records


def _messages(source: str, column: str, value: Any) -> list[dict[str, str]]:
    """The prompt as chat turns: a string is one user turn."""
    if isinstance(value, str):
        return [turn("user", value)]
    if not isinstance(value, list) or not all(isinstance(m, Mapping) for m in value):
        raise DataError(
            f"{source}: column {column!r} must hold text or a list of {{role, content}} messages"
        )
    turns = []
    for i, message in enumerate(value):
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{source}: message {i} of {column!r} has role {role!r}")
        turns.append(
            turn(role, text_cell(source, f"message {i} of {column!r}", message.get("content")))
        )
    if turns[-1]["role"] != "user":
        raise DataError(f"{source}: the prompt in {column!r} must end with a user message")
    return turns
