"""The table layouts chat and text data come in, and picking the one a file is in.

One small converter per layout (``data.format``): ``messages`` (OpenAI, with
tool calls and a ``tools`` column), ``sharegpt``, ``prompt_response``,
``alpaca``, ``preference``, ``kto`` and ``text`` (raw text for continued
pre-training). ``auto`` picks the chat layout whose columns the file has;
a file whose columns fit two layouts (``prompt`` with ``chosen``: SFT pairs
or preference pairs?) is refused with a request for ``data.format``, and
``text`` is taken only when no chat layout fits (Alpaca files often carry a
pre-rendered ``text`` column).
"""

from __future__ import annotations

from tunesmith.data.formats import (
    alpaca,
    kto,
    messages,
    preference,
    prompt_response,
    sharegpt,
    text,
)
from tunesmith.data.formats.base import Layout, ReadOptions
from tunesmith.data.loading import check_columns, one_line
from tunesmith.errors import DataError

#: Every layout by ``data.format`` name, chat layouts in today's detection order first.
LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        messages.LAYOUT,
        prompt_response.LAYOUT,
        alpaca.LAYOUT,
        sharegpt.LAYOUT,
        preference.LAYOUT,
        kto.LAYOUT,
        text.LAYOUT,
    )
}
#: ``data.format`` values: ``auto`` and every layout.
FORMAT_NAMES = ("auto", *LAYOUTS)
#: The configuration keys that rename a layout's columns (for error messages).
CONFIG_KEYS = {
    "messages": "data.messages_column",
    "prompt": "data.prompt_column",
    "response": "data.response_column",
    "text": "data.text_column",
    "label": "data.label_column",
}


def choose_layout(name: str, columns: list[str], fmt: str, opts: ReadOptions) -> Layout:
    """The layout of a file with ``columns``: ``fmt`` itself, or detected for ``auto``.

    Raises:
        DataError: A required column is missing, no layout fits, or (``auto``)
            two chat layouts fit and ``data.format`` must decide.
    """
    if fmt != "auto":
        layout = LAYOUTS[fmt]
    else:
        have = set(columns)
        fits = [
            layout
            for layout in LAYOUTS.values()
            if layout.chat and any(c in have for c in layout.indicators(opts))
        ]
        if len(fits) > 1:
            names = " and ".join(layout.name for layout in fits)
            raise DataError(
                f"{name}: the columns ({_listed(columns)}) fit the {names} layouts; say which "
                f"with data.format (one of {', '.join(LAYOUTS)})"
            )
        if not fits and opts.text_column in have:
            fits = [LAYOUTS["text"]]
        if not fits:
            raise DataError(
                f"{name}: no chat columns (columns: {_listed(columns)}); give a "
                f"{opts.messages_column!r} column of messages, {opts.prompt_column!r}/"
                f"{opts.response_column!r} columns, instruction/input/output, ShareGPT "
                "'conversations', prompt/chosen/rejected or prompt/completion/label (set "
                "data.messages_column or data.prompt_column/data.response_column, or "
                "data.format)"
            )
        layout = fits[0]
    check_columns(name, columns, dict(layout.required(opts)), CONFIG_KEYS)
    return layout


def _listed(columns: list[str]) -> str:
    return one_line(", ".join(map(str, columns[:20]))) + (", ..." if len(columns) > 20 else "")


__all__ = ["FORMAT_NAMES", "LAYOUTS", "Layout", "ReadOptions", "choose_layout"]
