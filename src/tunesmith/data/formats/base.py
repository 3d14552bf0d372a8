"""What every chat-data converter shares: the options, the layout shape, message checks.

A converter turns one raw row into the *parts* of a chat record: the
``messages`` to train on (OpenAI shape: ``role``, ``content`` and, for tool
use, ``tool_calls`` or a tool result), plus what its layout adds (``tools``
for the chat template, the ``prompt``/``chosen``/``rejected`` of a preference
pair, KTO's ``desirable`` flag). ``chat_record`` then checks the order of the
turns and adds the fields every task reads. Converters return None for a row
that is empty (blank prompt or reply), which the caller drops or refuses.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.loading import one_line, type_name
from tunesmith.errors import DataError

Message = dict[str, Any]
Parts = dict[str, Any]
#: Roles a chat may hold (OpenAI's, ``tool`` for a tool's result).
ROLES = ("system", "user", "assistant", "tool")
#: ShareGPT ``from`` names and the role each becomes; ``tool_call`` is an assistant
#: turn whose value is the call (``{"name", "arguments"}`` as JSON).
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function_call": "tool_call",
}
EXAMPLE = '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]'


@dataclass(frozen=True)
class ReadOptions:
    """The configured column names and what the rows are read for."""

    messages_column: str = "messages"
    prompt_column: str = "prompt"
    response_column: str = "response"
    text_column: str = "text"
    label_column: str = "label"
    #: ShareGPT ``from`` name -> role (``data.roles`` merged over ``SHAREGPT_ROLES``).
    roles: Mapping[str, str] = field(default_factory=lambda: dict(SHAREGPT_ROLES))
    #: Training data (ends with the reply) or prediction input (ends with the prompt).
    labelled: bool = True


@dataclass(frozen=True)
class Layout:
    """One table layout: the columns that say a file has it, those it needs, its converter."""

    name: str
    #: The columns whose presence says a file is in this layout (any of them).
    indicators: Callable[[ReadOptions], Sequence[str]]
    #: Record key -> column the layout needs (for this reading), checked once chosen.
    required: Callable[[ReadOptions], Mapping[str, str]]
    #: ``(source, raw row, options)`` -> record parts, or None for an empty row.
    convert: Callable[[str, Mapping[str, Any], ReadOptions], Parts | None]
    #: A chat layout (False: raw text for continued pre-training).
    chat: bool = True


def blank(value: Any) -> bool:
    """Whether a cell is missing or only whitespace."""
    return value is None or (isinstance(value, str) and not value.strip())


def text_cell(source: str, where: str, value: Any) -> str:
    """A cell that must hold text (blank cells are the caller's to handle).

    Raises:
        DataError: ``file:row: <where> must be text``.
    """
    if not isinstance(value, str):
        raise DataError(f"{source}: {where} must be text, got {type_name(value)}")
    return value


def json_cell(source: str, where: str, value: Any) -> Any:
    """A cell that may hold a JSON list or object written as a string (CSV files, ShareGPT)."""
    if not isinstance(value, str) or not value.lstrip().startswith(("[", "{")):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise DataError(f"{source}: {where} is not valid JSON ({err.msg})") from None


def turn(role: str, content: str) -> Message:
    """A plain message."""
    return {"role": role, "content": content}


def parse_messages(source: str, where: str, value: Any) -> list[Message] | None:
    """Validate a list of OpenAI-style messages; None for an empty chat or a blank turn.

    Accepted per message: ``role`` (system, user, assistant, tool) and ``content``
    (text, or a list of ``{"type": "text", "text"}`` parts, joined); an assistant
    message may carry ``tool_calls`` (then its content may be empty), a tool
    message ``tool_call_id`` and ``name``.

    Raises:
        DataError: ``file:row: messages[i].field`` and what is wrong with it.
    """
    value = json_cell(source, where, value)
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise DataError(
            f"{source}: {where} must be a list of messages, got {type_name(value)} "
            f"(write {EXAMPLE})"
        )
    messages = []
    for i, raw in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(raw, Mapping):
            raise DataError(
                f"{source}: {at} must be an object with text 'role' and 'content' "
                f"(got {one_line(raw)[:60]}; write {EXAMPLE})"
            )
        message = parse_message(source, at, raw)
        if message is None:
            return None
        messages.append(message)
    return messages


def parse_message(source: str, at: str, raw: Mapping[str, Any]) -> Message | None:
    """One message (see ``parse_messages``); None when its text is blank and it calls no tool."""
    role = raw.get("role")
    if role not in ROLES:
        raise DataError(f"{source}: {at} has role {role!r}; use one of {', '.join(ROLES)}")
    calls = raw.get("tool_calls")
    if calls is not None and role != "assistant":
        raise DataError(f"{source}: {at}.tool_calls: only an assistant message calls tools")
    content = _content(source, f"{at}.content", raw.get("content"), optional=bool(calls))
    if not content.strip() and not calls:
        return None
    message: Message = {"role": role, "content": content}
    if calls:
        message["tool_calls"] = tool_calls(source, f"{at}.tool_calls", calls)
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if raw.get(key) is not None:
                message[key] = text_cell(source, f"{at}.{key}", raw[key])
    return message


def _content(source: str, where: str, value: Any, *, optional: bool) -> str:
    """Message text: a string, or OpenAI's list of text parts joined."""
    if value is None and optional:
        return ""
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise DataError(
                    f"{source}: {where}[{j}]: only text parts ({{'type': 'text', 'text': ...}}) "
                    "can be trained on"
                )
            texts.append(text_cell(source, f"{where}[{j}].text", part.get("text")))
        return "".join(texts)
    if not isinstance(value, str):
        raise DataError(f"{source}: {where} must be text, got {type_name(value)} (write {EXAMPLE})")
    return value


def tool_calls(source: str, where: str, value: Any) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` as chat templates read them: arguments as an object.

    OpenAI writes ``function.arguments`` as a JSON string; Hugging Face chat
    templates expect a mapping (they serialise it themselves), so a string is parsed.
    """
    value = json_cell(source, where, value)
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DataError(f"{source}: {where} must be a non-empty list of tool calls")
    calls = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise DataError(
                f"{source}: {at} must be an object with function.name and function.arguments "
                '(write {"type": "function", "function": {"name": "f", "arguments": {}}})'
            )
        arguments = json_cell(source, f"{at}.function.arguments", function.get("arguments", {}))
        if not isinstance(arguments, Mapping):
            raise DataError(f"{source}: {at}.function.arguments must be a JSON object")
        out: dict[str, Any] = {
            "type": "function",
            "function": {"name": function["name"], "arguments": dict(arguments)},
        }
        if isinstance(call, Mapping) and isinstance(call.get("id"), str):
            out["id"] = call["id"]
        calls.append(out)
    return calls


def tool_specs(source: str, where: str, value: Any) -> list[dict[str, Any]] | None:
    """The ``tools`` cell: a list of function definitions (JSON string accepted); None if blank."""
    if blank(value) or value == []:
        return None
    value = json_cell(source, where, value)
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        raise DataError(
            f"{source}: {where} must be a list of tool definitions "
            '(write [{"type": "function", "function": {"name": ..., "parameters": {...}}}])'
        )
    return [dict(t) for t in value]


def with_tools(source: str, raw: Mapping[str, Any], messages: list[Message]) -> Parts:
    """The parts of a chat row: its messages, and its ``tools`` column when it has one."""
    parts: Parts = {"messages": messages}
    tools = tool_specs(source, "tools", raw.get("tools"))
    if tools:
        parts["tools"] = tools
    return parts
