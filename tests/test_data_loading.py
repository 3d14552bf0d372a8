"""Tests for tunesmith.data.loading: formats, sources and error messages."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunesmith.data import filter_labels, load_records
from tunesmith.errors import DataError


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def load_error(path: Path, **kwargs: object) -> str:
    """Load expecting a DataError; return its (single-line) message."""
    with pytest.raises(DataError) as info:
        load_records(path, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


# -- formats -------------------------------------------------------------------


def test_csv_records_and_physical_line_sources(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", 'text,label\ngood,pos\n"two\nlines",neg\n\nbad,neg\n')
    records = load_records(path)
    assert records == [
        {"text": "good", "label": "pos", "source": "train.csv:2"},
        {"text": "two\nlines", "label": "neg", "source": "train.csv:3"},
        {"text": "bad", "label": "neg", "source": "train.csv:6"},
    ]


def test_csv_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\r\nhello,a\r\nworld,b\r\n")
    records = load_records(path)
    assert [r["text"] for r in records] == ["hello", "world"]
    assert [r["source"] for r in records] == ["train.csv:2", "train.csv:3"]


def test_tsv(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.tsv", "label\ttext\npos\ta, b, c\nneg\tx\n")
    records = load_records(path)
    assert [(r["text"], r["label"]) for r in records] == [("a, b, c", "pos"), ("x", "neg")]
    assert records[1]["source"] == "dev.tsv:3"


def test_jsonl_skips_blank_lines_and_counts_them(tmp_path: Path) -> None:
    lines = ['{"text": "a", "label": "x"}', "", '{"text": "b", "label": "y", "extra": 1}']
    path = write(tmp_path / "train.jsonl", "\n".join(lines) + "\n")
    records = load_records(path)
    assert [r["source"] for r in records] == ["train.jsonl:1", "train.jsonl:3"]
    assert records[1] == {"text": "b", "label": "y", "source": "train.jsonl:3"}


def test_json_array_sources_are_element_lines(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    path = write(tmp_path / "train.json", json.dumps(rows, indent=2))
    records = load_records(path)
    assert [r["text"] for r in records] == ["a", "b"]
    assert [r["source"] for r in records] == ["train.json:2", "train.json:6"]


def test_json_with_json_lines_content(tmp_path: Path) -> None:
    path = write(tmp_path / "train.json", '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    assert [r["label"] for r in load_records(path)] == ["0", "1"]


def test_parquet_sources_are_row_indices(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), path)
    records = load_records(path)
    assert records == [
        {"text": "a", "label": "0", "source": "train.parquet#row 0"},
        {"text": "b", "label": "1", "source": "train.parquet#row 1"},
    ]


@pytest.mark.parametrize(
    ("suffix", "compress"),
    [(".csv.bz2", bz2.compress), (".csv.gz", gzip.compress), (".csv.xz", lzma.compress)],
)
def test_compressed_csv(tmp_path: Path, suffix: str, compress: object) -> None:
    path = tmp_path / f"train{suffix}"
    path.write_bytes(compress(b"text,label\nhi,a\nyo,b\n"))  # type: ignore[operator]
    records = load_records(path)
    assert [r["text"] for r in records] == ["hi", "yo"]
    assert records[1]["source"] == f"train{suffix}:3"


def test_compressed_jsonl_gz(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a", "label": "x"}\n'))
    assert load_records(path)[0] == {"text": "a", "label": "x", "source": "train.jsonl.gz:1"}


def test_corrupt_compressed_file(tmp_path: Path) -> None:
    path = tmp_path / "train.csv.gz"
    path.write_bytes(b"not gzip at all")
    assert "train.csv.gz: cannot decompress" in load_error(path)


def test_datasets_folder(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "train_ds"
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["x", "y"]}).save_to_disk(folder)
    records = load_records(folder)
    assert records[1] == {"text": "b", "label": "y", "source": "train_ds#row 1"}


def test_datasets_class_label_becomes_name(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]}, features=features)
    ds.save_to_disk(tmp_path / "ds")
    assert [r["label"] for r in load_records(tmp_path / "ds")] == ["pos", "neg"]


def test_datasets_dict_folder_lists_splits(tmp_path: Path) -> None:
    import datasets

    split = datasets.Dataset.from_dict({"text": ["a"], "label": ["x"]})
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(tmp_path / "dd")
    message = load_error(tmp_path / "dd")
    assert "dd" in message and "train, validation" in message and "<split>" in message
    assert load_records(tmp_path / "dd" / "validation")[0]["text"] == "a"


def test_text_pairs(tmp_path: Path) -> None:
    path = write(tmp_path / "nli.csv", "premise,hypothesis,label\nA,B,entail\n")
    records = load_records(path, text_column="premise", text_pair_column="hypothesis")
    assert records == [{"text": "A", "text_pair": "B", "label": "entail", "source": "nli.csv:2"}]


def test_unlabeled_input_needs_no_label_column(tmp_path: Path) -> None:
    path = write(tmp_path / "predict.csv", "text\nhello\n")
    assert load_records(path, label_column=None) == [
        {"text": "hello", "label": None, "source": "predict.csv:2"}
    ]


# -- label normalisation --------------------------------------------------------


def test_labels_are_normalised_to_strings(tmp_path: Path) -> None:
    labels = [1, 1.0, 2.5, True, False, " pos ", -3]
    lines = [json.dumps({"text": "t", "label": label}) for label in labels]
    path = write(tmp_path / "mixed.jsonl", "\n".join(lines))
    # One file with every kind of label; a real data set mixing kinds is refused by default.
    assert [r["label"] for r in load_records(path, check_label_kinds=False)] == [
        "1",
        "1",
        "2.5",
        "true",
        "false",
        "pos",
        "-3",
    ]


def test_csv_labels_are_stripped(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "text,label\na, pos \n")
    assert load_records(path)[0]["label"] == "pos"


def test_filter_labels_keeps_allowed_and_counts_dropped() -> None:
    records = [
        {"text": "a", "label": "pos", "source": "f:2"},
        {"text": "b", "label": "neutral", "source": "f:3"},
        {"text": "c", "label": "neg", "source": "f:4"},
        {"text": "d", "label": "neutral", "source": "f:5"},
        {"text": "e", "label": "other", "source": "f:6"},
    ]
    kept, dropped = filter_labels(records, ["pos", "neg"])
    assert [r["text"] for r in kept] == ["a", "c"]
    assert dropped == {"neutral": 2, "other": 1}


def test_filter_labels_keeps_unlabeled_rows() -> None:
    records = [{"text": "a", "label": None, "source": "f:2"}]
    assert filter_labels(records, ["pos"]) == (records, {})


# -- errors --------------------------------------------------------------------


def test_missing_file_suggests_similar_name(tmp_path: Path) -> None:
    write(tmp_path / "train.csv", "text,label\na,b\n")
    message = load_error(tmp_path / "trian.csv")
    assert message.startswith(f"data file not found: {tmp_path / 'trian.csv'}")
    assert f"did you mean {tmp_path / 'train.csv'}?" in message


def test_missing_file_without_similar_name(tmp_path: Path) -> None:
    message = load_error(tmp_path / "nothing_like_it.csv")
    assert message == f"data file not found: {tmp_path / 'nothing_like_it.csv'}"


def test_missing_folder(tmp_path: Path) -> None:
    assert "does not exist" in load_error(tmp_path / "nope" / "train.csv")


def test_unknown_suffix_lists_supported_formats(tmp_path: Path) -> None:
    message = load_error(write(tmp_path / "train.txt", "hello\n"))
    assert "train.txt" in message and "'.txt'" in message
    for suffix in (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".gz", ".bz2", ".xz"):
        assert suffix in message


def test_missing_text_column_suggests_closest(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "text,label\na,b\n")
    message = load_error(path, text_column="txt")
    assert message == (
        "train.csv: column 'txt' not found (columns: text, label; did you mean 'text'? "
        "set data.text_column)"
    )


def test_missing_label_column_names_config_key(tmp_path: Path) -> None:
    path = write(tmp_path / "train.jsonl", '{"text": "a", "category": "x"}\n')
    message = load_error(path)
    assert "train.jsonl: column 'label' not found" in message
    assert "category" in message and "data.label_column" in message


def test_missing_pair_column(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["a"], "label": ["x"]}), path)
    message = load_error(path, text_pair_column="text_b")
    assert "train.parquet: column 'text_b'" in message and "data.text_pair_column" in message


@pytest.mark.parametrize(
    ("name", "content"),
    [("train.csv", ""), ("train.csv", "text,label\n"), ("train.jsonl", "\n\n"), ("t.json", "[]")],
)
def test_empty_data_set(tmp_path: Path, name: str, content: str) -> None:
    assert load_error(write(tmp_path / name, content)).startswith(f"{name}: no rows")


def test_empty_parquet(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(
        pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())}), path
    )
    assert load_error(path).startswith("train.parquet: no rows")


def test_invalid_utf8_names_line_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\na,x\nb,x\nc,x\nbad \xff text,x\n")
    message = load_error(path)
    offset = path.read_bytes().index(b"\xff")
    assert message == (
        f"train.csv:5: not valid UTF-8 text (byte 0xff at offset {offset}); "
        "re-save the file as UTF-8"
    )


def test_empty_label_names_line_and_column(tmp_path: Path) -> None:
    rows = "".join(f"t{i},x\n" for i in range(15))
    path = write(tmp_path / "train.csv", f"text,label\n{rows}last,\n")
    assert load_error(path).startswith("train.csv:17: empty value in column 'label'")


def test_blank_text_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "train.tsv", "sentence\tlabel\nok\tx\n   \ty\n")
    assert load_error(path, text_column="sentence").startswith(
        "train.tsv:3: empty value in column 'sentence'"
    )


def test_missing_key_in_jsonl_row(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n')
    assert load_error(path).startswith("t.jsonl:2: empty value in column 'label'")


def test_null_in_parquet_names_row(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["a", None], "label": ["x", "y"]}), path)
    assert load_error(path).startswith("train.parquet#row 1: empty value in column 'text'")


@pytest.mark.parametrize("value", [42, ["a"], {"a": 1}])
def test_non_string_text_in_jsonl(tmp_path: Path, value: object) -> None:
    lines = [json.dumps({"text": "ok", "label": "x"}), json.dumps({"text": value, "label": "x"})]
    message = load_error(write(tmp_path / "t.jsonl", "\n".join(lines)))
    assert message.startswith("t.jsonl:2: column 'text' must be text")


def test_non_scalar_label_in_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", json.dumps({"text": "a", "label": ["x"]}))
    message = load_error(path)
    assert message.startswith("t.jsonl:1: column 'label'") and "list" in message


def test_malformed_json_line(tmp_path: Path) -> None:
    lines = ['{"text": "a", "label": "x"}', '{"text": "b", "label": "y"}', '{"text": "c", label}']
    message = load_error(write(tmp_path / "x.jsonl", "\n".join(lines)))
    assert message.startswith("x.jsonl:3: invalid JSON (")


def test_json_line_that_is_not_an_object(tmp_path: Path) -> None:
    message = load_error(write(tmp_path / "x.jsonl", '{"text": "a", "label": "x"}\n["b", "y"]\n'))
    assert message.startswith("x.jsonl:2: expected a JSON object") and "array" in message


def test_malformed_json_array(tmp_path: Path) -> None:
    path = write(tmp_path / "x.json", '[\n  {"text": "a", "label": "x"},\n  {"text": }\n]')
    assert load_error(path).startswith("x.json:3: invalid JSON (")


def test_csv_row_with_wrong_field_count(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "text,label\na,x\nb,c,x\n")
    message = load_error(path)
    assert message.startswith("train.csv:3: expected 2 fields (text, label) but found 3")


def test_unclosed_quote_points_at_its_row(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", 'text,label\na,x\n"unclosed,x\nb,y\n')
    assert load_error(path).startswith("train.csv:3: expected 2 fields")


def test_unterminated_json_array(tmp_path: Path) -> None:
    path = write(tmp_path / "x.json", '[\n  {"text": "a", "label": "x"},\n')
    assert load_error(path).startswith("x.json:3: invalid JSON (")


def test_invalid_utf8_offset_counts_the_bom(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\n\xfe,x\n")
    assert "train.csv:2: not valid UTF-8 text (byte 0xfe at offset 14)" in load_error(path)
