"""Reading instruction-tuning data as chats: lists of ``{role, content}`` messages.

Three table layouts are accepted, checked in this order:

1. a ``messages`` column (``data.messages_column``) holding the chat itself;
2. ``prompt``/``response`` columns (``data.prompt_column``/``response_column``);
3. Alpaca-style ``instruction``/``input``/``output`` columns (``input`` optional,
   appended to the instruction after a blank line).

Every record becomes ``{"messages", "text", "group", "source"}``: ``text`` is
the last user turn (echoed by ``predict``), ``group`` the first user turn, so
splitting keeps every answer to the same question on one side (the chatterbot
corpus repeats questions with different answers). For prediction the chat
ends with a user turn; for training it must end with an assistant turn.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunesmith.data.loading import check_columns, one_line, read_rows, type_name
from tunesmith.errors import DataError

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


def load_chats(
    path: str | Path,
    *,
    messages_column: str = "messages",
    prompt_column: str = "prompt",
    response_column: str = "response",
    labelled: bool = True,
    system_prompt: str | None = None,
    dropped: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Read a table of chats (any layout above) into records.

    Args:
        path: Any table ``read_rows`` reads (JSONL is the natural one for messages).
        messages_column: Column with the chat as a list of messages.
        prompt_column: Column with the user turn (layout 2).
        response_column: Column with the assistant reply (layout 2).
        labelled: Training/evaluation data (the chat must end with the assistant);
            False for prediction input (a trailing assistant turn is dropped).
        system_prompt: Put before chats that have no system message.
        dropped: When given, rows with an empty prompt or reply are skipped and
            their sources appended here; when None, such a row is an error.

    Raises:
        DataError: Naming the file, row and column of the first problem.
    """
    path = Path(path)
    columns, rows = read_rows(path)
    to_messages = _layout(
        path.name, columns, messages_column, prompt_column, response_column, labelled
    )
    records = []
    for source, raw in rows:
        messages = to_messages(source, raw)
        if messages is None:
            if dropped is None:
                raise DataError(f"{source}: empty prompt or reply; fill it in or drop the row")
            dropped.append(source)
            continue
        records.append(
            chat_record(messages, source, labelled=labelled, system_prompt=system_prompt)
        )
    if not records:
        raise DataError(f"{path.name}: no conversations found")
    return records


def chat_record(
    messages: list[Message], source: str, *, labelled: bool, system_prompt: str | None = None
) -> dict[str, Any]:
    """A record for ``messages`` after checking roles and order."""
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if not labelled and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    _check_order(source, messages, labelled)
    users = [m["content"] for m in messages if m["role"] == "user"]
    return {"messages": messages, "text": users[-1], "group": users[0], "source": source}


def prompt_record(text: str, source: str, system_prompt: str | None = None) -> dict[str, Any]:
    """A prediction record for one user message (``predict --text``)."""
    return chat_record(
        [{"role": "user", "content": text}], source, labelled=False, system_prompt=system_prompt
    )


def _layout(
    name: str,
    columns: list[str],
    messages_column: str,
    prompt_column: str,
    response_column: str,
    labelled: bool,
) -> Any:
    """The row -> messages converter for the columns this file has."""
    if messages_column in columns:
        return lambda source, raw: _messages_value(source, messages_column, raw[messages_column])
    if prompt_column in columns:
        reply = response_column if labelled else None
        if reply is not None:
            check_columns(name, columns, {"response": reply})
        return lambda source, raw: _pair(
            raw.get(prompt_column),
            raw.get(reply) if reply else None,
            source,
            (prompt_column, reply),
        )
    if "instruction" in columns and (not labelled or "output" in columns):
        return lambda source, raw: _pair(
            _alpaca_prompt(raw),
            raw.get("output") if labelled else None,
            source,
            ("instruction", "output" if labelled else None),
        )
    listed = one_line(", ".join(map(str, columns[:20])))
    raise DataError(
        f"{name}: no chat columns (columns: {listed}); give a {messages_column!r} column of "
        f"messages, or {prompt_column!r}/{response_column!r} columns, or "
        "instruction/input/output (set data.messages_column or data.prompt_column/"
        "data.response_column)"
    )


def _alpaca_prompt(raw: Mapping[str, Any]) -> Any:
    instruction, extra = raw.get("instruction"), raw.get("input")
    if isinstance(instruction, str) and isinstance(extra, str) and extra.strip():
        return f"{instruction}\n\n{extra}"
    return instruction


def _pair(prompt: Any, reply: Any, source: str, columns: tuple[str, str | None]) -> Any:
    """Messages for a prompt and (when labelled) reply; None when one is blank."""
    values = [(prompt, columns[0], "user")]
    if columns[1] is not None:
        values.append((reply, columns[1], "assistant"))
    messages = []
    for value, column, role in values:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str):
            raise DataError(f"{source}: column {column!r} must be text, got {type_name(value)}")
        messages.append({"role": role, "content": value})
    return messages


def _messages_value(source: str, column: str, value: Any) -> list[Message] | None:
    """Validate a list of ``{role, content}`` messages; None for an empty chat."""
    if value is None or value == []:
        return None
    example = '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]'
    if not isinstance(value, list):
        raise DataError(
            f"{source}: column {column!r} must be a list of messages, got {type_name(value)} "
            f"(write {example})"
        )
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str):
            raise DataError(
                f"{source}: {column}[{i}] must be an object with text 'role' and 'content' "
                f"(got {one_line(m)[:60]}; write {example})"
            )
        role = m.get("role")
        if role not in ROLES:
            raise DataError(
                f"{source}: {column}[{i}] has role {role!r}; use one of {', '.join(ROLES)}"
            )
        if not m["content"].strip():
            return None
        messages.append({"role": role, "content": m["content"]})
    return messages


def _check_order(source: str, messages: list[Message], labelled: bool) -> None:
    """System first (if any), then user and assistant alternating, ending as required."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in body):
        raise DataError(f"{source}: a system message may only come first")
    if not body or body[0]["role"] != "user":
        raise DataError(f"{source}: the conversation must start with a user message")
    for a, b in itertools.pairwise(body):
        if a["role"] == b["role"]:
            raise DataError(
                f"{source}: two {a['role']} messages in a row; user and assistant must alternate"
            )
    want = "assistant" if labelled else "user"
    if body[-1]["role"] != want:
        raise DataError(
            f"{source}: the conversation must end with {'an' if labelled else 'a'} {want} "
            f"message {'(the reply to train on)' if labelled else '(the prompt to answer)'}"
        )
