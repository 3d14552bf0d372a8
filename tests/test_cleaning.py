"""Data cleaning: normalisation, exact duplicates, conflicting labels, leakage, ``data inspect``.

The constructed files hold known duplicates (some only after normalising),
a conflicting-label pair, empty rows and held-out rows that repeat training
rows exactly or nearly, next to rows that must not be flagged, so every
count below is exact.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import tiny_config, write_csv
from helpers import cli_fails, write_config
from tunesmith.cli import main
from tunesmith.config.root import Config
from tunesmith.data.cleaning import normalize_record, normalize_text
from tunesmith.data.leakage import find_leaks, jaccard, match_key
from tunesmith.errors import DataError
from tunesmith.tasks.base import get_task

LONG_NEG = "the plot of this film was really very boring and dull from the start to the end"
LONG_POS = "a superb story with lovely acting and a really great plot that was fun"
# File rows (CSV line numbers from 2) and what cleaning must do with them.
TRAIN = [
    ("the movie was good fun", "pos"),  # 2
    ("the movie was good fun", "pos"),  # 3: exact duplicate of 2
    ("the film was awful", "neg"),  # 4
    ("the film was awful", "pos"),  # 5: same text, other label: kept, counted
    ("", "pos"),  # 6: empty
    ("caf\u00e9 was lovely", "pos"),  # 7
    ("cafe\u0301 was lovely", "pos"),  # 8: NFD accent: a duplicate of 7 once normalised
    ("a\u00a0really  great\u200b story", "pos"),  # 9: normalised to row 10's text
    ("a really great story", "pos"),  # 10: duplicate of 9 once normalised
    ("\u200b", "neg"),  # 11: empty once normalised
    ("the film was fine", "neutral"),  # 12: not in data.labels
    (LONG_NEG, "neg"),  # 13
    (LONG_POS, "pos"),  # 14
]
VALIDATION = [
    ("The movie was GOOD fun!", "pos"),  # exact leak (case and punctuation differ) of 2
    (LONG_NEG + " indeed", "neg"),  # near leak of 13: 15/16 words shared
    ("a plot that was dull", "neg"),  # shares words only
    ("lovely\u00a0acting and a superb plot", "pos"),  # shares words only
]
TEST = [
    ("cafe\u0301 was lovely", "pos"),  # exact leak of 7 (after normalising)
    (LONG_POS, "pos"),  # exact leak of 14
    (LONG_POS.replace("and a", "and") + " so", "pos"),  # near leak: 13/14 words
    (LONG_NEG.removesuffix(" to the end"), "neg"),  # 13/15 = 0.867: below 0.9
    ("boring", "neg"),
]
# Texts kept from the training file, normalised.
KEPT_TRAIN = [
    "the movie was good fun",
    "the film was awful",
    "the film was awful",
    "caf\u00e9 was lovely",
    "a really great story",
    LONG_NEG,
    LONG_POS,
]


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    return write_csv(path, [{"text": t, "label": lab} for t, lab in rows])


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {
        "train": _write(tmp_path / "train.csv", TRAIN),
        "validation": _write(tmp_path / "val.csv", VALIDATION),
        "test": _write(tmp_path / "test.csv", TEST),
    }


@pytest.fixture
def config(tiny_bert: Path, files: dict[str, Path], tmp_path: Path) -> dict:
    data = {
        "validation": str(files["validation"]),
        "test": str(files["test"]),
        "labels": ["neg", "pos"],
        "max_length": 8,
    }
    return tiny_config(tiny_bert, files["train"], tmp_path / "run", data=data)


def _splits(cfg: dict):
    return get_task(Config.from_dict(cfg)).load_splits()


# -- normalisation ----------------------------------------------------------------------
def test_normalize_text_fixes_spaces_and_unicode_but_keeps_indentation() -> None:
    raw = "  Cafe\u0301\u00a0 is\u200b \t nice\r\n    def f():\t\treturn  1  \r\n\r\n\tend\u3000"
    assert normalize_text(raw) == "Caf\u00e9 is nice\n    def f(): return 1\n\n\tend"
    assert normalize_text("a\u2003b\u202fc\ufeff") == "a b c"


def test_chat_and_tagged_records_are_normalised_in_place() -> None:
    chat = {
        "messages": [
            {"role": "user", "content": "Fix\u00a0this:\r\n  x  =  1"},
            {"role": "assistant", "content": "```\n    x = 1\n```"},
        ],
        "text": "Fix\u00a0this:\r\n  x  =  1",
        "group": "Fix\u00a0this:\r\n  x  =  1",
        "source": "c.jsonl:1",
    }
    out = normalize_record(chat)
    assert out["messages"][0]["content"] == out["text"] == out["group"] == "Fix this:\n  x = 1"
    assert out["messages"][1]["content"] == "```\n    x = 1\n```"  # code indentation kept
    tagged = {
        "text": "",
        "words": ["Cafe\u0301", "New\u00a0York", "\u200b"],
        "tags": ["B-ORG", "B-LOC", "O"],
        "source": "d.jsonl:1",
    }
    out = normalize_record(tagged)
    # Never split or merged (tags stay aligned); a token that would vanish is kept as is.
    assert out["words"] == ["Caf\u00e9", "New York", "\u200b"]
    assert out["text"] == "Caf\u00e9 New York \u200b" and out["tags"] == tagged["tags"]
    assert normalize_record({"text": "\u200b\u00a0", "label": "x", "source": "s"}) is None


# -- counts on the constructed files -----------------------------------------------------
def test_duplicates_empty_rows_and_conflicts_are_counted_by_file(config: dict) -> None:
    splits = _splits(config)
    q = splits.quality
    assert [r["text"] for r in splits.train] == KEPT_TRAIN
    assert [r["source"] for r in splits.train] == [
        f"train.csv:{n}" for n in (2, 4, 5, 7, 9, 13, 14)
    ]
    train, val, test = q.files
    assert (train.split, train.read, train.kept) == ("train", 13, 7)
    assert train.removed == {"empty": 2, "label not in data.labels": 1, "duplicate": 3}
    assert train.removed_examples == {
        "empty": ["train.csv:6", "train.csv:11"],
        "label not in data.labels": ["train.csv:12"],
        "duplicate": ["train.csv:3", "train.csv:8", "train.csv:10"],
    }
    assert train.conflicting_labels == 1
    assert train.conflict_examples == [["train.csv:4", "train.csv:5"]]
    assert train.normalized == 2  # rows 8 and 9 (row 11 became empty)
    assert (val.read, val.kept, val.removed, val.normalized) == (4, 4, {}, 1)
    assert (test.read, test.kept, test.removed) == (5, 5, {})
    assert q.removed() == {"empty": 2, "label not in data.labels": 1, "duplicate": 3}
    assert q.labels["train"] == {"neg": 2, "pos": 5} and q.imbalance is None  # 2.5x < 3


def test_held_out_rows_repeating_training_rows_are_flagged_not_dropped(config: dict) -> None:
    splits = _splits(config)
    leaks = splits.quality.leaks
    assert len(splits.validation) == 4 and len(splits.test) == 5  # flagged, kept
    got = {
        split: [(x.source, x.train_source, x.exact) for x in found]
        for split, found in leaks.items()
    }
    assert got == {
        "validation": [("val.csv:2", "train.csv:2", True), ("val.csv:3", "train.csv:13", False)],
        "test": [
            ("test.csv:2", "train.csv:7", True),
            ("test.csv:3", "train.csv:14", True),
            ("test.csv:4", "train.csv:14", False),
        ],
    }
    assert leaks["validation"][1].similarity == pytest.approx(15 / 16)
    assert leaks["test"][2].similarity == pytest.approx(13 / 14)
    # A lower threshold catches the 13/15 row too.
    config["data"]["clean"] = {"near_duplicate_threshold": 0.85}
    lower = _splits(config).quality.leaks["test"]
    assert [(x.source, round(x.similarity, 3)) for x in lower[3:]] == [("test.csv:5", 0.867)]


def test_report_goes_to_the_log_notes_and_splits_json(config: dict) -> None:
    splits = _splits(config)
    (paragraph,) = [n for n in splits.notes if n.startswith("data cleaning:")]
    assert "13 train rows read from train.csv, 2 empty dropped" in paragraph
    assert "3 exact duplicates dropped" in paragraph and "1 with conflicting labels" in paragraph
    assert "2 of 4 validation rows (1 exactly) and 3 of 5 test rows (2 exactly)" in paragraph
    assert "train labels 2 neg / 5 pos (balanced)" in paragraph
    saved = json.loads(json.dumps(splits.provenance))["cleaning"]
    assert saved["removed"] == {"empty": 2, "label not in data.labels": 1, "duplicate": 3}
    assert saved["leakage"]["test"]["rows"] == 3 and saved["leakage"]["test"]["exact"] == 2
    assert saved["files"][0]["removed_examples"]["duplicate"] == [
        "train.csv:3",
        "train.csv:8",
        "train.csv:10",
    ]


def test_imbalance_warning_from_the_configured_ratio(config: dict) -> None:
    config["data"]["clean"] = {"imbalance_ratio": 1.3}
    quality = _splits(config).quality
    assert quality.imbalance.startswith(
        "labels are imbalanced: 'pos' has 5 training rows, 'neg' 2 (2.5x"
    )


def test_cleaning_off_keeps_the_rows_exactly(config: dict) -> None:
    config["data"]["clean"] = {"normalize": False, "drop_duplicates": False}
    splits = _splits(config)
    expected = [t for t, lab in TRAIN if lab != "neutral" and t]
    assert [r["text"] for r in splits.train] == expected  # untouched, duplicates included
    assert splits.quality.files[0].removed == {"empty": 1, "label not in data.labels": 1}
    assert splits.quality.files[0].conflicting_labels == 1


def test_empty_rows_error_covers_texts_empty_once_normalised(config: dict) -> None:
    config["data"]["empty_rows"] = "error"
    config["data"]["train"] = str(_write(Path(config["data"]["test"]).parent / "z.csv", TRAIN[9:]))
    with pytest.raises(DataError, match=r"z\.csv:2: a text is empty once invisible"):
        _splits(config)


def test_split_records_of_a_run_are_normalised_like_training(config: dict) -> None:
    config["data"].pop("validation")
    task = get_task(Config.from_dict(config))
    splits = task.load_splits()
    again = task.split_records(splits.provenance, "validation", "splits.json")
    assert again == splits.validation
    chosen = {**splits.provenance, "rows": {"validation": ["train.csv:9", "train.csv:8"]}}
    texts = [r["text"] for r in task.split_records(chosen, "validation", "splits.json")]
    assert texts == ["a really great story", "caf\u00e9 was lovely"]


def test_tagged_data_is_normalised_with_tags_aligned_and_deduplicated(
    tiny_bert: Path, tmp_path: Path
) -> None:
    rows = [
        {"tokens": ["Cafe\u0301", "in", "New\u00a0York"], "tags": ["B-ORG", "O", "B-LOC"]},
        {"tokens": ["Caf\u00e9", "in", "New York"], "tags": ["B-ORG", "O", "B-LOC"]},  # dup
        {"tokens": ["Caf\u00e9", "in", "New York"], "tags": ["B-ORG", "O", "O"]},  # conflict
        {"tokens": ["Bob", "\u200b", "visited"], "tags": ["B-PER", "O", "O"]},
    ]
    train = tmp_path / "t.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = tiny_config(tiny_bert, train, tmp_path / "run", task={"type": "token_classification"})
    cfg["data"]["validation_fraction"] = 0.25
    splits = _splits(cfg)
    records = sorted(splits.train + splits.validation, key=lambda r: r["source"])
    assert [(r["words"], r["tags"]) for r in records] == [
        (["Caf\u00e9", "in", "New York"], ["B-ORG", "O", "B-LOC"]),
        (["Caf\u00e9", "in", "New York"], ["B-ORG", "O", "O"]),
        (["Bob", "\u200b", "visited"], ["B-PER", "O", "O"]),
    ]
    assert records[0]["text"] == "Caf\u00e9 in New York"
    (report,) = splits.quality.files
    assert report.removed == {"duplicate": 1} and report.conflicting_labels == 1
    assert splits.quality.label_kind == "entity type"


# -- leakage search ----------------------------------------------------------------------
def test_prefix_filtered_search_finds_what_brute_force_finds() -> None:
    rng = random.Random(3)
    words = [f"w{i}" for i in range(60)]

    def row(i: int, side: str) -> dict:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        return {"text": text, "source": f"{side}:{i}"}

    train = [row(i, "t") for i in range(300)]
    held = [row(i, "h") for i in range(300)]
    for i in range(0, 300, 7):  # near copies: one word added
        held[i] = {"text": train[i]["text"] + " w1", "source": f"h:{i}"}
    for threshold in (0.5, 0.7, 0.9):
        found = {x.source: x.similarity for x in find_leaks(train, held, threshold)}
        expected = {}
        for h in held:
            a = frozenset(match_key(h["text"]).split())
            best = max(jaccard(a, frozenset(match_key(t["text"]).split())) for t in train)
            if best >= threshold:
                expected[h["source"]] = best
        assert found.keys() == expected.keys(), threshold
        assert found == pytest.approx(expected)


# -- data inspect ----------------------------------------------------------------------
def test_data_inspect_prints_and_writes_the_report(
    config: dict, tmp_path: Path, capsys, monkeypatch
) -> None:
    path = write_config(tmp_path, config)
    monkeypatch.chdir(tmp_path)
    assert main(["data", "inspect", str(path)]) == 0
    captured = capsys.readouterr()
    assert "wrote the report as JSON to data_report.json" in captured.err
    assert "leakage" in captured.out and "truncation" in captured.out
    report = json.loads((tmp_path / "data_report.json").read_text(encoding="utf-8"))
    assert report["task_type"] == "sequence_classification"
    assert report["cleaning"]["removed"] == {
        "empty": 2,
        "label not in data.labels": 1,
        "duplicate": 3,
    }
    assert report["cleaning"]["leakage"]["validation"]["rows"] == 2
    assert [leak["source"] for leak in report["cleaning"]["leakage"]["test"]["examples"]] == [
        "test.csv:2",
        "test.csv:3",
        "test.csv:4",
    ]
    # Every word of these texts is one token (known or [UNK]); [CLS] and [SEP] add two.
    lengths = [len(t.split()) + 2 for t in KEPT_TRAIN]
    lost = [n - 8 for n in lengths if n > 8]
    (train,) = [t for t in report["truncation"] if t["split"] == "train"]
    assert train == {
        "split": "train",
        "part": "input",
        "limit": 8,
        "rows": 7,
        "truncated": len(lost),
        "tokens_lost": sum(lost),
        "max_lost": max(lost),
        "longest": max(lengths),
    }
    assert len(lost) == 2  # the two long rows
    out = tmp_path / "reports" / "q.json"
    assert main(["data", "inspect", str(path), "--output", str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8")) == report
    cli_fails(capsys, ["data", "inspect", str(path), "--output", str(tmp_path)], "is a folder")


def test_multitask_reports_each_task(
    tiny_bert: Path, files: dict[str, Path], tmp_path: Path, capsys
) -> None:
    sentences = [
        {"tokens": ["Bob", "visited", "Paris"], "tags": ["B-PER", "O", "B-LOC"]},
        {"tokens": ["Bob", "visited", "Paris"], "tags": ["B-PER", "O", "B-LOC"]},  # duplicate
        {"tokens": ["Ann", "met", "Bob"], "tags": ["B-PER", "O", "B-PER"]},
        {"tokens": ["Eve", "met", "Bob"], "tags": ["B-PER", "O", "B-PER"]},
    ]
    tagged = tmp_path / "t.jsonl"
    tagged.write_text("".join(json.dumps(r) + "\n" for r in sentences), encoding="utf-8")
    cfg = tiny_config(tiny_bert, files["train"], tmp_path / "run")
    cfg["data"] = {"validation_fraction": 0.3}
    cfg["task"] = {"type": "multitask"}
    sentiment = {"train": str(files["train"]), "labels": ["neg", "pos"]}
    tasks = {
        "sentiment": {"type": "sequence_classification", "data": sentiment},
        "ner": {"type": "token_classification", "data": {"train": str(tagged)}},
    }
    cfg["multitask"] = {"tasks": tasks}
    splits = _splits(cfg)
    assert splits.quality is None  # each task has its own, in its provenance
    saved = splits.provenance["tasks"]
    assert saved["sentiment"]["cleaning"]["removed"]["duplicate"] == 3
    assert saved["ner"]["cleaning"]["removed"] == {"duplicate": 1}
    assert sum(n.startswith("ner: data cleaning:") for n in splits.notes) == 1
    out = tmp_path / "r.json"
    assert main(["data", "inspect", str(write_config(tmp_path, cfg)), "--output", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["task_type"] == "multitask" and sorted(report["tasks"]) == ["ner", "sentiment"]
    assert report["tasks"]["ner"]["cleaning"]["label_kind"] == "entity type"
    assert "task ner (token_classification)" in capsys.readouterr().out
