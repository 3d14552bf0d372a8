"""KTO rows: ``prompt``, ``completion`` and a boolean ``label`` (desirable or not).

Unpaired feedback: each completion is marked good or bad on its own. The
record's ``messages`` are prompt + completion and ``desirable`` holds the label.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tunesmith.data.formats.base import Layout, Parts, ReadOptions
from tunesmith.data.formats.preference import side
from tunesmith.data.loading import type_name
from tunesmith.errors import DataError

COMPLETION = "completion"
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def desirable(source: str, column: str, value: Any) -> bool:
    """A KTO label: a boolean (``true``/``false``, ``1``/``0``, ``yes``/``no`` in text files).

    Raises:
        DataError: Anything else, naming the row and the column.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str | int) else None
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise DataError(
        f"{source}: column {column!r} must be true or false (desirable or not), got "
        f"{value!r} ({type_name(value)})"
    )


def convert(source: str, raw: Mapping[str, Any], opts: ReadOptions) -> Parts | None:
    """Prompt and completion as messages and the label; None when either text is blank."""
    prompt = side(source, opts.prompt_column, raw.get(opts.prompt_column), "user")
    if prompt is None:
        return None
    if not opts.labelled:
        return {"messages": prompt, "prompt": prompt}
    completion = side(source, COMPLETION, raw.get(COMPLETION), "assistant")
    if completion is None:
        return None
    return {
        "messages": prompt + completion,
        "prompt": prompt,
        "completion": completion,
        "desirable": desirable(source, opts.label_column, raw.get(opts.label_column)),
    }


LAYOUT = Layout(
    "kto",
    indicators=lambda o: [COMPLETION],
    required=lambda o: (
        {"prompt": o.prompt_column, "completion": COMPLETION, "label": o.label_column}
        if o.labelled
        else {"prompt": o.prompt_column}
    ),
    convert=convert,
)
