"""Reading word-tagged data (NER) and splitting raw text into words.

Token classification data comes as one word per line with its tag (CoNLL
style, a blank line between sentences) or as table rows holding a list of
tokens and a list of tags (JSONL, Parquet, ``save_to_disk`` folders). Both end
up as the same record::

    {"text": "EU rejects German call", "words": [...], "tags": [...] | None,
     "source": "train.conll:17"}

``text`` is the words joined by single spaces, so character offsets of
predictions refer to a string the user can see. Records made from raw text
(prediction input) also carry ``spans``, the character span of each word in
the original text, which is not a space-joined string.

Tags are checked on reading (``O``, ``B-TYPE``, ``I-TYPE``, and ``E-``/``S-``
for IOBES) because a tag without a prefix would be silently mis-parsed into
entities by the metric (``PER`` reads as prefix ``P``, type ``ER``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunesmith.data.loading import (
    COMPRESSIONS,
    check_columns,
    one_line,
    read_rows,
    read_text,
    type_name,
)
from tunesmith.errors import DataError

#: Suffixes read as CoNLL-style text (one ``token<TAB>tag`` per line). ``.tsv`` is
#: included: a table cell cannot hold a list of tokens, so a TSV of tagged
#: tokens is always one token per line.
CONLL_SUFFIXES = (".conll", ".txt", ".tsv", ".bio", ".iob")
_TAG = re.compile(r"O|[BIES]-\S.*")
_DOCSTART = "-DOCSTART-"
#: Split off the start of a whitespace word (one character each).
_OPENING = "([{\"'\u201c\u2018\u00ab"
#: Split off the end of a whitespace word (one character each).
_CLOSING = ".,!?;:)]}\"'\u201d\u2019\u00bb\u2026"

Span = tuple[int, int]


def is_conll(path: str | Path) -> bool:
    """True when the file's suffix (before any compression suffix) names CoNLL text."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return bool(suffixes) and suffixes[-1] in CONLL_SUFFIXES


def load_tagged(
    path: str | Path,
    *,
    tokens_column: str = "tokens",
    tags_column: str | None = "tags",
    text_column: str = "text",
    dropped: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Read a CoNLL file or a table of token and tag lists into records.

    Args:
        path: A CoNLL-style file (see ``CONLL_SUFFIXES``, optionally
            compressed) or any table ``load_records`` reads.
        tokens_column: Table column holding the list of tokens.
        tags_column: Table column holding the list of tags; None reads
            unlabelled input (prediction), where a table may give raw text in
            ``text_column`` instead of tokens.
        text_column: Raw-text column, used only for unlabelled tables without
            ``tokens_column``.
        dropped: When given, table rows with no tokens are skipped and their
            sources appended here; when None, such a row is an error.

    Returns:
        Records ``{"text", "words", "tags", "source"}`` in file order (plus
        ``spans`` for raw text).

    Raises:
        DataError: Naming the file and line (or row) of the first problem.
    """
    path = Path(path)
    if is_conll(path):
        records = _read_conll(path, labelled=tags_column is not None)
    else:
        records = _read_table(path, tokens_column, tags_column, text_column, dropped)
    if not records:
        raise DataError(f"{path.name}: no sentences found; add tagged tokens")
    return records


def check_tag(tag: Any, where: str) -> str:
    """Return ``tag`` if it is ``O`` or ``<B|I|E|S>-TYPE``; DataError naming ``where`` otherwise."""
    if isinstance(tag, str) and _TAG.fullmatch(tag):
        return tag
    hint = " (numeric tags: write the tag names instead)" if isinstance(tag, int) else ""
    raise DataError(
        f"{where}: tag {one_line(repr(tag))[:40]} is not a BIO tag{hint}; use O, B-TYPE and "
        "I-TYPE (IOBES also E-TYPE and S-TYPE)"
    )


def tagged_record(words: list[str], tags: list[str] | None, source: str) -> dict[str, Any]:
    """The record of one pre-split sentence; its ``text`` is the words joined by spaces."""
    return {"text": " ".join(words), "words": words, "tags": tags, "source": source}


def text_record(text: str, source: str) -> dict[str, Any]:
    """A prediction record for raw text: its words (``split_words``) and their spans."""
    words, spans = split_words(text)
    return {"text": text, "words": words, "tags": None, "spans": spans, "source": source}


def word_spans(record: dict[str, Any]) -> list[Span]:
    """Character span of every word of ``record`` in ``record["text"]``."""
    if "spans" in record:
        return record["spans"]
    spans, start = [], 0
    for word in record["words"]:
        spans.append((start, start + len(word)))
        start += len(word) + 1
    return spans


def split_words(text: str) -> tuple[list[str], list[Span]]:
    """Split raw text into words the way CoNLL/WNUT data is tokenised, keeping offsets.

    Words are runs of non-space characters, with opening brackets/quotes
    peeled off their start and closing punctuation (``.,!?;:`` closing
    brackets and quotes) off their end as words of their own: ``"(Paris!)"``
    gives ``(``, ``Paris``, ``!``, ``)``. Inner punctuation stays (``U.S``,
    ``http://t.co/x``, ``@user``, ``#tag``, ``it's``), and a word made only of
    punctuation keeps its last character attached (``:)`` -> ``:``, ``)``).

    Returns:
        The words and the ``(start, end)`` character span of each in ``text``.
    """
    words: list[str] = []
    spans: list[Span] = []
    for match in re.finditer(r"\S+", text):
        start, end = match.span()
        head: list[Span] = []
        tail: list[Span] = []
        while end - start > 1 and text[start] in _OPENING:
            head.append((start, start + 1))
            start += 1
        while end - start > 1 and text[end - 1] in _CLOSING:
            tail.append((end - 1, end))
            end -= 1
        for span in [*head, (start, end), *reversed(tail)]:
            words.append(text[span[0] : span[1]])
            spans.append(span)
    return words, spans


# -- CoNLL ---------------------------------------------------------------------
def _read_conll(path: Path, *, labelled: bool) -> list[dict[str, Any]]:
    """One token per line (tab- or space-separated fields, the tag last); blank lines split.

    Lines of whitespace only (WNUT writes a lone tab) end a sentence, and so do
    ``-DOCSTART-`` document markers (CoNLL-2003), which are skipped.
    """
    name = path.name
    records: list[dict[str, Any]] = []
    words: list[str] = []
    tags: list[str] = []
    first = 0
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip() or line.startswith(_DOCSTART):
            if words:
                records.append(tagged_record(words, tags if labelled else None, f"{name}:{first}"))
            words, tags = [], []
            continue
        fields = [f.strip() for f in line.split("\t")] if "\t" in line else line.split()
        token = fields[0]
        if not token:
            raise DataError(
                f"{name}:{number}: the line starts with a tab (empty token); write "
                "'token<TAB>tag' on each line"
            )
        if not words:
            first = number
        words.append(token)
        if labelled:
            tag = next((f for f in reversed(fields[1:]) if f), None)
            if tag is None:
                raise DataError(
                    f"{name}:{number}: token {one_line(repr(token))[:40]} has no tag; write "
                    "'token<TAB>tag' on each line and a blank line between sentences"
                )
            tags.append(check_tag(tag, f"{name}:{number}"))
    if words:
        records.append(tagged_record(words, tags if labelled else None, f"{name}:{first}"))
    return records


# -- tables (JSONL, Parquet, save_to_disk) --------------------------------------
def _read_table(
    path: Path,
    tokens_column: str,
    tags_column: str | None,
    text_column: str,
    dropped: list[str] | None,
) -> list[dict[str, Any]]:
    """Rows with a list of tokens and a list of tags (or raw text, for prediction)."""
    columns, rows = read_rows(path)
    if tags_column is None and tokens_column not in columns and text_column in columns:
        return _raw_text_rows(rows, text_column, dropped)
    wanted = {"tokens": tokens_column, **({"tags": tags_column} if tags_column else {})}
    check_columns(path.name, columns, wanted)
    records = []
    for source, raw in rows:
        tokens = raw.get(tokens_column)
        if dropped is not None and not tokens:
            dropped.append(source)
            continue
        words = _token_list(source, tokens_column, tokens)
        tags = None
        if tags_column is not None:
            tags = _tag_list(source, tags_column, raw.get(tags_column), len(words))
        records.append(tagged_record(words, tags, source))
    return records


def _raw_text_rows(
    rows: Sequence[tuple[str, Any]], column: str, dropped: list[str] | None
) -> list[dict[str, Any]]:
    """Unlabelled raw texts (prediction input), split into words by ``split_words``."""
    records = []
    for source, raw in rows:
        value = raw.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            if dropped is not None:
                dropped.append(source)
                continue
            raise DataError(
                f"{source}: empty value in column {column!r}; fill it in or drop the row"
            )
        if not isinstance(value, str):
            raise DataError(f"{source}: column {column!r} must be text, got {type_name(value)}")
        records.append(text_record(value, source))
    return records


def _token_list(source: str, column: str, value: Any) -> list[str]:
    """A non-empty list of non-blank strings."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else type_name(value)
        raise DataError(
            f"{source}: column {column!r} must be a non-empty list of tokens, got {got} "
            '(write "tokens": ["EU", "rejects", ...]; CSV cells cannot hold lists)'
        )
    for i, token in enumerate(value):
        if not isinstance(token, str) or not token.strip():
            got = repr(token) if isinstance(token, str) else type_name(token)
            raise DataError(
                f"{source}: token {i} in column {column!r} must be non-blank text, got {got}"
            )
    return list(value)


def _tag_list(source: str, column: str, value: Any, n_words: int) -> list[str]:
    """One valid tag per token."""
    if not isinstance(value, list):
        raise DataError(
            f"{source}: column {column!r} must be a list of tags, got {type_name(value)}"
        )
    if len(value) != n_words:
        raise DataError(
            f"{source}: {n_words} tokens but {len(value)} tags in column {column!r}; "
            "give exactly one tag per token"
        )
    return [check_tag(t, f"{source}: column {column!r}, token {i}") for i, t in enumerate(value)]
