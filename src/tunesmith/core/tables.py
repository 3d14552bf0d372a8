"""Tables as Markdown and as HTML: one place for the escaping and alignment rules.

Reports, ``compare`` and the evaluator print the same rows in different
media; cells are given as text already (numbers formatted by the caller),
optionally with a link.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    """A table cell that links somewhere (HTML: an anchor; Markdown: a link)."""

    text: str
    href: str


Cell = str | Link


def _md(cell: Cell) -> str:
    if isinstance(cell, Link):
        return f"[{cell.text}]({cell.href})"
    return cell.replace("|", "\\|").replace("\n", " ")


def _html(cell: Cell) -> str:
    if isinstance(cell, Link):
        return f'<a href="{html.escape(cell.href)}">{html.escape(cell.text)}</a>'
    return html.escape(cell)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(_md(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    """An HTML ``<table>`` (escaped)."""
    head = "".join(f"<th>{_html(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_html(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def text_table(header: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    """Columns padded with spaces, for terminals."""
    cells = [list(header)] + [[c.text if isinstance(c, Link) else c for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells)
