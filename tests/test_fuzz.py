"""Property-based fuzzing of the input readers: garbage in, ``TunesmithError`` (or data) out.

The config loader and the data readers face whatever users point them at. For
any text or bytes they either succeed (valid by chance) or raise a member of
the ``TunesmithError`` family, which the CLI prints as one line (a config error:
one line per problem); anything else
(a ``ValueError`` from deep inside PyYAML, a ``zlib.error``) would be a
traceback. Regressions for the crashes the fuzzer found are pinned at the end.
"""

from __future__ import annotations

import gzip
import json
import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tunesmith.config.root import Config
from tunesmith.data import load_records
from tunesmith.errors import ConfigError, DataError, TunesmithError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MINIMAL = "model:\n  name_or_path: org/some-model\ndata:\n  train: train.csv\n"
TEXT_FORMATS = (".csv", ".tsv", ".jsonl", ".json")

# Text that survives a UTF-8 round trip (no lone surrogates), biased towards YAML,
# CSV and JSON syntax so the parsers get past their first character.
SYNTAX = ":-[]{}\"',\t\n #&*!|>%@`?=.0123456789eE+_\\\x00\x01\r"
texts = st.text(st.characters(blacklist_categories=("Cs",)) | st.sampled_from(SYNTAX), max_size=200)
# Keys a config really has, mixed with near misses, so validation paths are reached.
SECTION_KEYS = {
    "model": ["name_or_path", "trust_remote_code", "allow_unsafe_weights"],
    "data": ["train", "validation", "labels", "max_length", "validation_fraction"],
    "method": ["name", "r", "alpha", "blocks", "lr_multipliers"],
    "optim": ["lr", "betas", "warmup_ratio", "scheduler"],
    "train": ["epochs", "batch_size", "early_stopping_patience", "precision", "seed"],
    "eval": ["metric", "greater_is_better"],
}
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | texts
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@st.composite
def config_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """Nearly valid configs: real sections and keys (some misspelt), random values."""
    cfg: dict[str, Any] = {}
    for section in draw(st.lists(st.sampled_from([*SECTION_KEYS, "optimm"]), max_size=6)):
        keys = SECTION_KEYS.get(section, ["lr"])
        key = draw(st.sampled_from(keys) | st.text(string.ascii_lowercase + "_", max_size=8))
        cfg.setdefault(section, {})[key] = draw(json_values)
    return cfg


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def load_config(path: Path, overrides: tuple[str, ...] = ()) -> None:
    """Load; a ConfigError must be one line per problem (the CLI prints it as is)."""
    try:
        Config.load(path, overrides)
    except ConfigError as err:
        first, *problems = str(err).split("\n")
        if problems:  # several: a count line, then one indented line each
            assert first == f"{path}: {len(problems)} problems"
            assert all(p.startswith("  ") and not p[2:].startswith(" ") for p in problems)


def load_data(path: Path, **kwargs: Any) -> None:
    """Read; a DataError must be one line naming the file."""
    try:
        load_records(path, **kwargs)
    except DataError as err:
        assert "\n" not in str(err) and path.name in str(err)


# -- the config loader ------------------------------------------------------


@FUZZ
@given(text=texts)
@example("a: 2020-13-45\n")  # PyYAML raised ValueError for an impossible date
@example("a: !!timestamp x\n")  # ... and AttributeError for a malformed timestamp tag
@example("model: {name_or_path: m}\ndata: {train: \x01}\n")  # ReaderError escaped the try
def test_config_loader_on_random_text(workdir: Path, text: str) -> None:
    path = workdir / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    load_config(path)


@FUZZ
@given(data=st.binary(max_size=200))
@example(b"model: m\xff\n")
def test_config_loader_on_random_bytes(workdir: Path, data: bytes) -> None:
    path = workdir / "cfg.yaml"
    path.write_bytes(data)
    load_config(path)


@FUZZ
@given(cfg=config_dicts())
def test_config_loader_on_nearly_valid_configs(workdir: Path, cfg: dict[str, Any]) -> None:
    path = workdir / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    load_config(path)


@FUZZ
@given(overrides=st.lists(texts, max_size=3))
@example(["optim.lr=1_e5"])  # looked like a number to the override parser; float() disagreed
@example(["optim.lr=2020-13-45"])
@example(["data.train=" + "x" * 5000])  # Path.exists() raised "File name too long"
@example(["\n"])  # the override was quoted as is: a message of two lines
def test_overrides_on_random_text(workdir: Path, overrides: list[str]) -> None:
    path = workdir / "cfg.yaml"
    path.write_text(MINIMAL, encoding="utf-8")
    load_config(path, tuple(overrides))


def test_file_name_too_long_in_config_is_not_a_crash(workdir: Path) -> None:
    path = workdir / "cfg.yaml"
    path.write_text(MINIMAL.replace("train.csv", "x" * 5000), encoding="utf-8")
    assert Config.load(path).data.train == "x" * 5000  # left as written; the reader says more


# -- the data readers ---------------------------------------------------------


def reader_options() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "dropped": st.sampled_from([None, []]),
            "label_column": st.sampled_from(["label", None]),
        }
    )


@FUZZ
@given(suffix=st.sampled_from(TEXT_FORMATS), text=texts, options=reader_options())
@example(".jsonl", '{"text": "a", "label": ' + "1" * 5000 + "}", {})  # int too long: ValueError
@example(".json", '[{"text": "a", "label": ' + "1" * 5000 + "}]", {})
@example(".jsonl", "[" * 100_000, {})  # RecursionError inside json
@example(".csv", '"te\nxt",label\na,b\n', {})  # a line break in the listed column names
def test_readers_on_random_text(
    workdir: Path, suffix: str, text: str, options: dict[str, Any]
) -> None:
    path = workdir / f"data{suffix}"
    path.write_text(text, encoding="utf-8")
    load_data(path, **options)


@FUZZ
@given(
    suffix=st.sampled_from([*TEXT_FORMATS, ".parquet", ".csv.gz", ".jsonl.xz", ".tsv.bz2"]),
    data=st.binary(max_size=300),
)
@example(".csv.gz", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03garbage")  # zlib.error
def test_readers_on_random_bytes(workdir: Path, suffix: str, data: bytes) -> None:
    path = workdir / f"data{suffix}"
    path.write_bytes(data)
    load_data(path)


@FUZZ
@given(header=st.lists(texts, min_size=1, max_size=3), rows=st.lists(st.lists(texts, max_size=4)))
@example(['"0'], [['0"'], ["0"]])  # a quoted line break in the header, listed in the message
def test_csv_with_random_fields(workdir: Path, header: list[str], rows: list[list[str]]) -> None:
    lines = [["text", "label", *header], *rows]
    path = workdir / "fields.tsv"
    path.write_text("\n".join("\t".join(line) for line in lines), encoding="utf-8")
    load_data(path)


@FUZZ
@given(rows=st.lists(st.dictionaries(st.sampled_from(["text", "label", "x"]), json_values)))
def test_jsonl_with_random_values(workdir: Path, rows: list[dict[str, Any]]) -> None:
    path = workdir / "values.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    load_data(path)


def test_gzip_with_a_corrupt_body_is_a_data_error(workdir: Path) -> None:
    path = workdir / "train.csv.gz"
    path.write_bytes(gzip.compress(b"text,label\na,b\n")[:12] + b"garbage")
    with pytest.raises(DataError, match=r"train\.csv\.gz: cannot decompress"):
        load_records(path)


def test_the_family_is_what_the_cli_catches() -> None:
    assert issubclass(ConfigError, TunesmithError) and issubclass(DataError, TunesmithError)
