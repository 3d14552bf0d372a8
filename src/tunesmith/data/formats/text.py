"""Raw text for continued pre-training: a text column, or a ``.txt`` file of paragraphs.

No chat template, every token trained. A table's ``data.text_column`` holds
one document per row; a plain ``.txt`` file (optionally compressed) is split
into documents at blank lines, each named by the line it starts on.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunesmith.data.formats.base import Layout, Parts, ReadOptions, blank, text_cell
from tunesmith.data.loading import Row, read_text

SUFFIXES = (".txt",)


def is_text_file(path: Path) -> bool:
    """Whether ``path`` is a plain text file (``.txt``, maybe ``.txt.gz``) rather than a table."""
    suffixes = [s.lower() for s in path.suffixes]
    return bool(suffixes) and (
        suffixes[-1] in SUFFIXES or (len(suffixes) > 1 and suffixes[-2] in SUFFIXES)
    )


def paragraphs(path: Path, column: str) -> tuple[list[str], list[Row]]:
    """A text file's blank-line separated paragraphs as rows of ``column``."""
    rows: list[Row] = []
    lines: list[str] = []
    start = 0
    for number, line in enumerate([*read_text(path).splitlines(), ""], start=1):
        if line.strip():
            if not lines:
                start = number
            lines.append(line)
        elif lines:
            rows.append((f"{path.name}:{start}", {column: "\n".join(lines)}))
            lines = []
    return [column], rows


def convert(source: str, raw: Mapping[str, Any], opts: ReadOptions) -> Parts | None:
    """The document's text; None when blank."""
    value = raw.get(opts.text_column)
    if blank(value):
        return None
    return {"text": text_cell(source, f"column {opts.text_column!r}", value)}


LAYOUT = Layout(
    "text",
    indicators=lambda o: [o.text_column],
    required=lambda o: {"text": o.text_column},
    convert=convert,
    chat=False,
)
