"""Reading instruction-tuning and pre-training data into records.

A file is read in one layout (``data/formats``: OpenAI ``messages`` with
tools, ``prompt_response``, ``alpaca``, ``sharegpt``, ``preference``,
``kto``, or raw ``text``), given by ``data.format`` or detected; the log
says which. Chat rows become ``{"messages", "text", "group", "source"}``
(plus ``tools`` and what the layout adds): ``text`` is the last user turn
(echoed by ``predict``), ``group`` the first user turn, so splitting keeps
every answer to the same question on one side (the chatterbot corpus repeats
questions with different answers). For prediction the chat ends with a user
(or tool) turn; for training it must end with an assistant turn. Text rows
become ``{"text", "source"}``: documents, every token trained.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from tunesmith.config.data import DataConfig
from tunesmith.data.formats import ReadOptions, choose_layout
from tunesmith.data.formats.base import SHAREGPT_ROLES, Message, turn
from tunesmith.data.formats.text import is_text_file, paragraphs
from tunesmith.data.loading import read_rows
from tunesmith.errors import DataError

log = logging.getLogger(__name__)


def read_chat_file(
    path: str | Path,
    opts: ReadOptions,
    *,
    fmt: str = "auto",
    system_prompt: str | None = None,
    dropped: list[str] | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """Read a file of chats (or documents) in layout ``fmt`` (``auto``: detected).

    Args:
        path: Any table ``read_rows`` reads, or a ``.txt`` file of paragraphs (text only).
        opts: Column names, ShareGPT role names, and whether rows are labelled.
        fmt: A ``data.format`` value.
        system_prompt: Put before chats that have no system message.
        dropped: When given, rows with an empty prompt or reply are skipped and
            their sources appended here; when None, such a row is an error.

    Returns:
        The layout's name and the records.

    Raises:
        DataError: Naming the file, row and field of the first problem.
    """
    path = Path(path)
    if is_text_file(path):
        if fmt not in ("auto", "text"):
            raise DataError(f"{path.name}: a plain text file can only be read as data.format text")
        columns, rows = paragraphs(path, opts.text_column)
    else:
        columns, rows = read_rows(path)
    layout = choose_layout(path.name, columns, fmt, opts)
    log.info("%s: read as %s (data.format %s)", path.name, layout.name, fmt)
    records = []
    for source, raw in rows:
        parts = layout.convert(source, raw, opts)
        if parts is None:
            if dropped is None:
                what = "text" if not layout.chat else "prompt or reply"
                raise DataError(f"{source}: empty {what}; fill it in or drop the row")
            dropped.append(source)
            continue
        if not layout.chat:
            unlabelled = {} if opts.labelled else {"labelled": False}  # a text to continue
            records.append({**parts, "source": source, **unlabelled})
            continue
        records.append(
            chat_record(
                parts.pop("messages"),
                source,
                labelled=opts.labelled,
                system_prompt=system_prompt,
                **parts,
            )
        )
    if not records:
        raise DataError(f"{path.name}: no {'conversations' if layout.chat else 'text'} found")
    return layout.name, records


def load_chats(
    path: str | Path,
    *,
    messages_column: str = "messages",
    prompt_column: str = "prompt",
    response_column: str = "response",
    labelled: bool = True,
    system_prompt: str | None = None,
    dropped: list[str] | None = None,
    fmt: str = "auto",
) -> list[dict[str, Any]]:
    """The records of ``read_chat_file`` with the default options and these columns."""
    opts = replace(
        ReadOptions(),
        messages_column=messages_column,
        prompt_column=prompt_column,
        response_column=response_column,
        labelled=labelled,
    )
    return read_chat_file(path, opts, fmt=fmt, system_prompt=system_prompt, dropped=dropped)[1]


def chat_record(
    messages: list[Message],
    source: str,
    *,
    labelled: bool,
    system_prompt: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A record for ``messages`` (``extra``: tools, preference parts) after checking the turns."""
    if system_prompt and messages[0]["role"] != "system":
        messages = [turn("system", system_prompt), *messages]
    if not labelled and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    check_order(source, messages, labelled)
    users = [m["content"] for m in messages if m["role"] == "user"]
    return {"messages": messages, "text": users[-1], "group": users[0], "source": source, **extra}


def prompt_record(text: str, source: str, system_prompt: str | None = None) -> dict[str, Any]:
    """A prediction record for one user message (``predict --text``)."""
    return chat_record([turn("user", text)], source, labelled=False, system_prompt=system_prompt)


#: The roles that may follow each kind of turn (an assistant calling tools is ``call``).
_NEXT = {
    "user": ("assistant",),
    "assistant": ("user",),
    "call": ("tool",),
    "tool": ("tool", "assistant"),
}


def check_order(source: str, messages: list[Message], labelled: bool) -> None:
    """System first (if any); user and assistant alternate; tool results follow a tool call.

    Raises:
        DataError: Naming the row and the rule it breaks.
    """
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in body):
        raise DataError(f"{source}: a system message may only come first")
    if not body or body[0]["role"] != "user":
        raise DataError(f"{source}: the conversation must start with a user message")
    for i in range(1, len(body)):
        before, role = _kind(body[i - 1]), body[i]["role"]
        if role in _NEXT[before]:
            continue
        if role == "tool":
            raise DataError(f"{source}: a tool message must follow an assistant tool call")
        if before == "call":
            raise DataError(f"{source}: an assistant tool call must be followed by its result")
        if before == "tool":
            raise DataError(f"{source}: after a tool result comes the assistant's answer")
        raise DataError(
            f"{source}: two {role} messages in a row; user and assistant must alternate"
        )
    last = body[-1]["role"]
    if labelled and last != "assistant":
        raise DataError(
            f"{source}: the conversation must end with an assistant message (the reply to train on)"
        )
    if not labelled and last not in ("user", "tool"):
        raise DataError(f"{source}: the conversation must end with a user message (the prompt)")


def _kind(message: Message) -> str:
    return "call" if message.get("tool_calls") else message["role"]


def read_options(data: DataConfig, *, labelled: bool = True) -> ReadOptions:
    """The reading options the ``data`` section sets."""
    return ReadOptions(
        messages_column=data.messages_column,
        prompt_column=data.prompt_column,
        response_column=data.response_column,
        text_column=data.text_column,
        label_column=data.label_column,
        roles={**SHAREGPT_ROLES, **data.roles},
        labelled=labelled,
    )
