"""OpenAI ``messages`` rows: the chat itself, tool calls and tool results, a ``tools`` column.

``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "",
"tool_calls": [...]}, {"role": "tool", "content": "..."}, ...], "tools": [...]}``; the
``tools`` definitions go to the chat template (``tools=``) when the row is rendered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tunesmith.data.formats.base import Layout, Parts, ReadOptions, parse_messages, with_tools


def convert(source: str, raw: Mapping[str, Any], opts: ReadOptions) -> Parts | None:
    """The row's messages (and tools); None for an empty chat."""
    column = opts.messages_column
    messages = parse_messages(source, column, raw.get(column))
    if messages is None:
        return None
    return with_tools(source, raw, messages)


LAYOUT = Layout(
    "messages",
    indicators=lambda o: [o.messages_column],
    required=lambda o: {"messages": o.messages_column},
    convert=convert,
)
