"""Read data files into plain record dicts with precise, one-line errors.

Every record carries a ``source`` (``file:line`` or ``file#row N``) so later
stages (label checks, predictions) can point the user at the exact row. Text
files are parsed with the standard library rather than pandas because only a
hand-driven parser knows the physical line each row starts on.
"""

from __future__ import annotations

import bz2
import csv
import difflib
import gzip
import io
import json
import lzma
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tunesmith.core import paths
from tunesmith.data.labels import normalise_label
from tunesmith.data.targets import TargetReader
from tunesmith.errors import DataError

Row = tuple[str, Mapping[str, Any]]  # (source, raw values by column)

FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
COMPRESSIONS = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress}
_CONFIG_KEYS = {
    "text": "data.text_column",
    "text_pair": "data.text_pair_column",
    "label": "data.label_column",
    "tokens": "data.tokens_column",
    "tags": "data.tags_column",
    "target": "data.target_column",
}
_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_SPACE = re.compile(r"[ \t\r\n]*")
_NUMERIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def load_records(
    path: str | Path,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str | None = "label",
    target_column: str | None = None,
    dropped: list[str] | None = None,
    check_label_kinds: bool = True,
    config_keys: Mapping[str, str] | None = None,
    targets: TargetReader | None = None,
) -> list[dict[str, Any]]:
    """Load a data set file (or ``save_to_disk`` folder) into records.

    Args:
        path: A ``.csv``, ``.tsv``, ``.jsonl``/``.json`` or ``.parquet`` file,
            optionally compressed (``.gz``, ``.bz2``, ``.xz``), or a folder
            written by ``datasets.Dataset.save_to_disk``.
        text_column: Column holding the input text.
        text_pair_column: Optional second text column (sentence pairs).
        label_column: Label column, or ``None`` for unlabeled input.
        target_column: Output text column (seq2seq), or ``None``; read like a
            text column (non-blank string) into the record's ``target``.
        dropped: When given, rows with an empty text, target or label are skipped and
            their sources appended here (real data has such rows); when None,
            such a row is an error.
        check_label_kinds: Refuse a label column mixing numbers and names (``1``
            and ``"pos"``, also ``"1"`` and ``"pos"`` in a CSV): almost always a
            data bug. Off when the user lists the labels to keep (``data.labels``).
        config_keys: Record key -> the config key naming its column, where a
            task maps a key to another setting than the default (seq2seq reads
            ``text`` from ``data.source_column``), so messages name the right key.
        targets: Reads the record's ``targets`` (multi-label sets, regression
            numbers, ``data/targets.py``); a row whose targets are empty is
            dropped like an empty label.

    Returns:
        Records ``{"text", ["text_pair"], ["target"], "label", ["targets"], "source"}``
        in file order.

    Raises:
        DataError: On any missing, malformed or inconsistent input.
    """
    path = Path(path)
    wanted = {
        "text": text_column,
        "text_pair": text_pair_column,
        "target": target_column,
        "label": label_column,
    }
    wanted = {key: col for key, col in wanted.items() if col is not None}
    columns, rows = read_rows(path)
    check_columns(path.name, columns, wanted, config_keys)
    if targets is not None:
        check_columns(
            path.name,
            columns,
            {c: c for c in targets.columns},
            dict.fromkeys(targets.columns, targets.config_key),
        )
    records = []
    kinds: dict[str, tuple[int, str, Any]] = {}  # label kind -> (rows, first source, value)
    for source, raw in rows:
        if dropped is not None and _is_empty_row(raw, wanted):
            dropped.append(source)
            continue
        record = _make_record(source, raw, wanted)
        if targets is not None:
            record["targets"] = targets.parse(source, raw)
            if record["targets"] is None:
                if dropped is None:
                    raise DataError(f"{source}: empty target ({targets.config_key}); fill it in")
                dropped.append(source)
                continue
        records.append(record)
        if record["label"] is not None:
            kind = "number" if _NUMERIC.fullmatch(record["label"]) else "text"
            count, first, example = kinds.get(kind, (0, source, raw.get(wanted["label"])))
            kinds[kind] = (count + 1, first, example)
    if not records:
        raise DataError(f"{path.name}: no rows (only a header); add data rows")
    if check_label_kinds and len(kinds) > 1:
        raise _mixed_labels_error(wanted["label"], kinds)
    return records


def read_rows(path: str | Path) -> tuple[list[str], list[Row]]:
    """Columns and ``(source, values)`` rows of a data file or ``save_to_disk`` folder.

    The one entry point for tabular input, shared by every task, so all of them
    get the same formats, decompression, encoding checks and error messages.

    Raises:
        DataError: The path is missing, or the file is unreadable or malformed.
    """
    path = Path(path)
    if not paths.exists(path):
        raise DataError(_not_found_message(path))
    return _read_datasets_folder(path) if path.is_dir() else _read_file(path)


def read_text(path: str | Path) -> str:
    """The UTF-8 text of a file in a non-tabular format (e.g. CoNLL), decompressed by suffix.

    Raises:
        DataError: The file is missing, not decompressible or not UTF-8 text.
    """
    path = Path(path)
    if not paths.exists(path):
        raise DataError(_not_found_message(path))
    if path.is_dir():
        raise DataError(f"{path}: a folder, not a text file")
    suffix = path.suffix.lower()
    return _decode(path.name, _read_bytes(path, suffix if suffix in COMPRESSIONS else None))


def filter_labels(
    records: Sequence[dict[str, Any]], allowed: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Keep records whose label is in ``allowed``; report what was dropped.

    Unlabeled records (prediction input) have nothing to filter and are kept.

    Returns:
        The kept records and the number of dropped rows per label, in order
        of first appearance, so the caller can tell the user what was lost.
    """
    keep = {normalise_label(label) for label in allowed}
    kept: list[dict[str, Any]] = []
    dropped: dict[str, int] = {}
    for record in records:
        label = record.get("label")
        if label is None or label in keep:
            kept.append(record)
        else:
            dropped[label] = dropped.get(label, 0) + 1
    return kept, dropped


def _mixed_labels_error(column: str, kinds: Mapping[str, tuple[int, str, Any]]) -> DataError:
    """Name the first row of the rarest label kind and an example of the commonest."""
    order = sorted(kinds, key=lambda kind: kinds[kind][0])
    rare, common = order[0], order[-1]
    count, source, value = kinds[rare]
    others, other_source, other_value = kinds[common]
    rows = "1 row" if count == 1 else f"{count} rows"
    return DataError(
        f"{source}: label {_short(value)} is {'a number' if rare == 'number' else 'text'}, "
        f"but column {column!r} also holds "
        f"{common} labels ({others} rows, e.g. {_short(other_value)} at {other_source}; "
        f"{rows} with {rare} labels); use one kind of label throughout, or list the labels "
        "to keep in data.labels"
    )


def _short(value: Any) -> str:
    text = one_line(json.dumps(value) if not isinstance(value, str) else repr(value))
    return text if len(text) <= 40 else text[:37] + "..."


def _not_found_message(path: Path) -> str:
    """Explain a missing path, suggesting a similarly named sibling."""
    folder = path.parent
    if not folder.is_dir():
        return f"data file not found: {path} (folder '{folder}' does not exist)"
    names = [p.name for p in folder.iterdir()]
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    hint = f" (did you mean {folder / close[0]}?)" if close else ""
    return f"data file not found: {path}{hint}"


def _split_suffix(path: Path) -> tuple[str, str | None]:
    """Return the format suffix and the compression suffix (if any)."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    fmt = suffixes[-1] if suffixes else ""
    if fmt not in FORMATS:
        supported = ", ".join(FORMATS)
        raise DataError(
            f"{path.name}: unsupported data format {fmt or '(no suffix)'!r} (supported: "
            f"{supported}, optionally compressed .gz/.bz2/.xz, or a folder written by "
            "datasets' save_to_disk); rename the file or convert it"
        )
    return fmt, compression


def _read_bytes(path: Path, compression: str | None) -> bytes:
    """Read the file, decompressing it when its name says so."""
    data = path.read_bytes()
    if compression is None:
        return data
    try:
        return COMPRESSIONS[compression](data)
    except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error) as err:
        raise DataError(
            f"{path.name}: cannot decompress {compression} data ({one_line(err)}); "
            "check the file is complete and its suffix matches its compression"
        ) from err


def _decode(name: str, data: bytes) -> str:
    """Decode UTF-8 (dropping a BOM), naming the line of the first bad or NUL byte.

    A NUL byte is valid UTF-8 but never text: the file is binary, or UTF-16
    (whose ASCII characters each carry a NUL byte).
    """
    if data.startswith(_UTF16_BOMS):
        raise DataError(f"{name}:1: the file is UTF-16 text; re-save it as UTF-8")
    skip = len(_BOM) if data.startswith(_BOM) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = skip + err.start
        line = data.count(b"\n", 0, offset) + 1
        raise DataError(
            f"{name}:{line}: not valid UTF-8 text (byte 0x{data[offset]:02x} at offset "
            f"{offset}); re-save the file as UTF-8"
        ) from err
    if "\x00" in text:
        offset = data.index(b"\x00")
        line = data.count(b"\n", 0, offset) + 1
        raise DataError(
            f"{name}:{line}: NUL byte at offset {offset}: the file is binary or UTF-16, "
            "not UTF-8 text; re-save it as UTF-8 text"
        )
    return text


def _read_file(path: Path) -> tuple[list[str], list[Row]]:
    """Dispatch on the suffix and return (columns, rows)."""
    fmt, compression = _split_suffix(path)
    data = _read_bytes(path, compression)
    if fmt == ".parquet":
        return _read_parquet(path.name, data)
    text = _decode(path.name, data)
    if fmt in (".csv", ".tsv"):
        return _read_delimited(path.name, text, "\t" if fmt == ".tsv" else ",")
    if fmt == ".json" and text.lstrip().startswith("["):
        return _columns_of(_read_json_array(path.name, text))
    return _columns_of(_read_json_lines(path.name, text))


def _read_delimited(name: str, text: str, delimiter: str) -> tuple[list[str], list[Row]]:
    """Parse CSV/TSV, recording the physical line each row starts on."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    rows: list[Row] = []
    start = 1
    try:
        for fields in reader:
            line, start = start, reader.line_num + 1
            if not fields:
                continue  # blank line
            if header is None:
                header = [h.strip() for h in fields]
                continue
            if len(fields) != len(header):
                names = one_line(", ".join(header))
                raise DataError(
                    f"{name}:{line}: expected {len(header)} fields ({names}) but "
                    f"found {len(fields)}; quote values that contain the delimiter or a line "
                    "break, and check for a stray or unclosed quote"
                )
            rows.append((f"{name}:{line}", dict(zip(header, fields, strict=True))))
    except csv.Error as err:
        raise DataError(
            f"{name}:{start}: malformed {'TSV' if delimiter == chr(9) else 'CSV'} "
            f"({one_line(err)}); check quoting on that line"
        ) from err
    return header or [], rows


def _read_json_lines(name: str, text: str) -> Iterator[Row]:
    """Parse one JSON object per line; blank lines are ignored."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as err:  # ValueError: also huge integers
            raise _json_error(f"{name}:{number}", err) from err
        yield _require_object(f"{name}:{number}", obj)


def _json_error(where: str, err: Exception) -> DataError:
    """Word a JSON syntax error with its location."""
    if isinstance(err, json.JSONDecodeError):
        reason = f"{err.msg.removesuffix(' at')} at column {err.colno}"
    elif isinstance(err, RecursionError):
        reason = "nested too deeply"
    else:
        reason = one_line(err)
    return DataError(
        f"{where}: invalid JSON ({reason}); fix that line (write one "
        "object per line, or a single array of objects in a .json file)"
    )


def _read_json_array(name: str, text: str) -> Iterator[Row]:
    """Parse a top-level JSON array, tracking the line each element starts on."""
    decoder = json.JSONDecoder()
    pos = _SPACE.match(text, text.index("[") + 1).end()
    if text.startswith("]", pos):
        return  # empty array
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise _json_error(f"{name}:{err.lineno}", err) from err
        except (ValueError, RecursionError) as err:
            raise _json_error(f"{name}:{text.count(chr(10), 0, pos) + 1}", err) from err
        yield _require_object(f"{name}:{text.count(chr(10), 0, pos) + 1}", obj)
        pos = _SPACE.match(text, end).end()
        if text.startswith("]", pos):
            return
        if not text.startswith(",", pos):
            line = text.count("\n", 0, pos) + 1
            raise DataError(f"{name}:{line}: invalid JSON (expected ',' or ']' in the array)")
        pos = _SPACE.match(text, pos + 1).end()


def _require_object(source: str, obj: Any) -> Row:
    """Each JSON row must be an object mapping column names to values."""
    if not isinstance(obj, dict):
        raise DataError(
            f'{source}: expected a JSON object like {{"text": ...}}, got {type_name(obj)}'
        )
    return source, obj


def _columns_of(rows: Iterator[Row]) -> tuple[list[str], list[Row]]:
    """Materialise JSON rows and collect the union of their keys, in order."""
    materialised = list(rows)
    columns: dict[str, None] = {}
    for _, raw in materialised:
        columns.update(dict.fromkeys(raw))
    return list(columns), materialised


def _read_parquet(name: str, data: bytes) -> tuple[list[str], list[Row]]:
    """Read a Parquet file with pyarrow; sources are 0-based row indices."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        raise DataError(
            f"{name}: not a readable Parquet file ({one_line(err)}); re-export it"
        ) from err
    return table.column_names, _column_rows(name, table.column_names, table.to_pydict())


def _read_datasets_folder(path: Path) -> tuple[list[str], list[Row]]:
    """Load a ``save_to_disk`` folder; a DatasetDict must be narrowed to a split."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(
            f"{path.name}: folder is not a data set written by datasets' save_to_disk "
            f"({one_line(err)}); point at a data file or a save_to_disk folder"
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        splits = ", ".join(loaded)
        raise DataError(
            f"{path.name}: folder holds several splits ({splits}); point at "
            f"{path}/<split>, e.g. {path / next(iter(loaded), 'train')}"
        )
    values = loaded.to_dict()
    for column, feature in loaded.features.items():
        if isinstance(feature, datasets.ClassLabel):  # ints -> their class names
            values[column] = [None if v is None else feature.int2str(v) for v in values[column]]
        elif isinstance(inner := getattr(feature, "feature", None), datasets.ClassLabel):
            # A list of class labels per row (token tags, e.g. conll2003's ner_tags).
            values[column] = [None if v is None else inner.int2str(v) for v in values[column]]
    return loaded.column_names, _column_rows(path.name, loaded.column_names, values)


def _column_rows(name: str, columns: list[str], values: dict[str, list[Any]]) -> list[Row]:
    """Turn column-oriented values into rows sourced as ``name#row N``."""
    count = len(values[columns[0]]) if columns else 0
    return [(f"{name}#row {i}", {col: values[col][i] for col in columns}) for i in range(count)]


def check_columns(
    name: str,
    columns: list[str],
    wanted: dict[str, str],
    config_keys: Mapping[str, str] | None = None,
) -> None:
    """Every configured column must exist; suggest the closest real name.

    Args:
        name: File name for the message.
        columns: The columns the file has.
        wanted: Record key (``text``, ``label``, ``tokens``, ...) -> configured column.
        config_keys: Record key -> config key to name in the message, where it
            is not the default one (``_CONFIG_KEYS``).
    """
    keys = {**_CONFIG_KEYS, **(config_keys or {})}
    if not columns:
        raise DataError(f"{name}: no rows (the file is empty)")
    for key, column in wanted.items():
        if column in columns:
            continue
        more = ", ..." if len(columns) > 20 else ""
        listed = one_line(", ".join(map(str, columns[:20]))) + more
        close = difflib.get_close_matches(column, columns, n=1, cutoff=0.5)
        guess = f"did you mean {close[0]!r}? " if close else ""
        fix = f"set {keys[key]}" if key in keys else "add it, or set data.format"
        raise DataError(f"{name}: column {column!r} not found (columns: {listed}; {guess}{fix})")


def _make_record(source: str, raw: Mapping[str, Any], wanted: dict[str, str]) -> dict[str, Any]:
    """Validate one row and build the record dict."""
    record: dict[str, Any] = {}
    for key in ("text", "text_pair", "target"):
        if key in wanted:
            record[key] = _text_value(source, wanted[key], raw.get(wanted[key]))
    record["label"] = _label_value(source, wanted["label"], raw) if "label" in wanted else None
    record["source"] = source
    return record


def _is_empty_row(raw: Mapping[str, Any], wanted: dict[str, str]) -> bool:
    """True when a wanted text is blank or the label is missing."""
    for key, column in wanted.items():
        value = raw.get(column)
        if key == "label":
            try:
                if normalise_label(value) is None:
                    return True
            except TypeError:
                return False  # a malformed label is an error, not an empty one
        elif value is None or (isinstance(value, str) and not value.strip()):
            return True
    return False


def _text_value(source: str, column: str, value: Any) -> str:
    """Text must be a non-blank string; anything else names row and column."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{source}: empty value in column {column!r}; fill it in or drop the row")
    if not isinstance(value, str):
        raise DataError(
            f"{source}: column {column!r} must be text, got {type_name(value)} "
            f"({one_line(value)[:40]}); quote it as a string"
        )
    return value


def _label_value(source: str, column: str, raw: Mapping[str, Any]) -> str:
    """Labels are normalised to strings and must be present."""
    try:
        label = normalise_label(raw.get(column))
    except TypeError as err:
        raise DataError(f"{source}: column {column!r}: {err}") from err
    if label is None:
        raise DataError(f"{source}: empty value in column {column!r}; fill it in or drop the row")
    return label


def type_name(value: Any) -> str:
    """JSON-flavoured type names read better in messages than Python ones."""
    names = {dict: "object", list: "array", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), type(value).__name__)


def one_line(value: Any) -> str:
    """Collapse whitespace so library messages keep our errors on one line."""
    return " ".join(str(value).split())
