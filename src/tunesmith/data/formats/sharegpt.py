"""ShareGPT rows: ``conversations`` of ``{"from", "value"}`` turns, role names mapped.

``from`` names become roles through ``data.roles`` (merged over the usual
ones: human/gpt/system, observation/tool for tool results, and
``function_call`` for an assistant turn whose value is the call as JSON,
``{"name", "arguments"}``). Optional ``system`` and ``tools`` columns (the
LLaMA-Factory variant) give the system message and the tool definitions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tunesmith.data.formats.base import (
    Layout,
    Message,
    Parts,
    ReadOptions,
    blank,
    json_cell,
    parse_message,
    text_cell,
    tool_calls,
    turn,
    with_tools,
)
from tunesmith.data.loading import type_name
from tunesmith.errors import DataError

COLUMN = "conversations"


def convert(source: str, raw: Mapping[str, Any], opts: ReadOptions) -> Parts | None:
    """The conversation as messages; None when it is empty or a turn is blank."""
    value = json_cell(source, COLUMN, raw.get(COLUMN))
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise DataError(
            f"{source}: {COLUMN} must be a list of turns, got {type_name(value)} "
            '(write [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}])'
        )
    messages: list[Message] = []
    if not blank(raw.get("system")):
        messages.append(turn("system", text_cell(source, "system", raw["system"])))
    for i, item in enumerate(value):
        at = f"{COLUMN}[{i}]"
        if not isinstance(item, Mapping) or "from" not in item or "value" not in item:
            raise DataError(f"{source}: {at} must be an object with 'from' and 'value'")
        name = item["from"]
        role = opts.roles.get(name) if isinstance(name, str) else None
        if role is None:
            known = ", ".join(sorted(opts.roles))
            raise DataError(
                f"{source}: {at}.from is {name!r}, which maps to no role (known: {known}); "
                "map it with data.roles, e.g. data.roles={" + f'"{name}": "user"' + "}"
            )
        if role == "tool_call":
            calls = tool_calls(source, f"{at}.value", item["value"])
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            continue
        message = parse_message(source, at, {"role": role, "content": item["value"]})
        if message is None:
            return None
        messages.append(message)
    return with_tools(source, raw, messages)


LAYOUT = Layout(
    "sharegpt",
    indicators=lambda o: [COLUMN],
    required=lambda o: {"conversations": COLUMN},
    convert=convert,
)
