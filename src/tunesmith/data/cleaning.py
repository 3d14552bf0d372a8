"""Row cleaning on reading, and the report that counts every removed row by reason.

Scraped and exported text carries invisible differences (no-break and
zero-width spaces, decomposed accents, Windows line ends) that make equal
rows look different: they repeat in training, and a test row equal to a
training row slips through unnoticed. Cleaning (``data.clean``) therefore

* normalises every input text (``normalize_text``; NER tokens get the
  Unicode fixes only and are never split or merged, so tags stay aligned);
* drops rows that repeat an earlier row of the same file exactly (label
  included), keeping the first; rows with the same input but another label
  are kept and counted as conflicting labels, since which label is right is
  the user's call;
* flags (never drops) validation/test rows that repeat training rows
  (``data/leakage.py``), and counts labels per split.

Nothing is removed silently: rows dropped while reading (empty, label not in
``data.labels``) and here (empty after normalising, duplicate) are counted
per file and reason in the ``CleaningReport``, which training logs as one
paragraph (``summary_paragraph``) and saves in ``splits.json``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config.data import CleanConfig
from tunesmith.data.labels import label_counts, sort_labels
from tunesmith.data.leakage import Leak, find_leaks
from tunesmith.errors import DataError

Records = list[dict[str, Any]]

#: Removal reasons, as the report names them.
EMPTY = "empty"
LABEL_NOT_LISTED = "label not in data.labels"
DUPLICATE = "duplicate"
#: Training rows whose answer the length limit cuts, dropped by ``data.drop_truncated``.
TRUNCATED = "truncated"
#: Sources kept per removal reason and leakage examples per split: enough to look
#: at, small enough for ``splits.json``.
EXAMPLES = 20
#: Record keys holding input text; ``source`` (the row locator) and labels never change.
TEXT_KEYS = ("text", "text_pair", "target", "group")
#: Keys that are the answer rather than the input (conflicting labels compare the rest).
LABEL_KEYS = ("label", "tags", "targets")

_ODD_SPACES = re.compile("[\u00a0\u2000-\u200a\u202f\u3000]")
_ZERO_WIDTH = re.compile("[\u200b-\u200d\ufeff]")
_BLANKS = re.compile(r"[ \t]+")


def _unicode_fixes(text: str) -> str:
    """NFC, zero-width characters removed, odd spaces made plain spaces."""
    text = unicodedata.normalize("NFC", text)
    return _ODD_SPACES.sub(" ", _ZERO_WIDTH.sub("", text))


def normalize_text(text: str) -> str:
    """Unicode fixes, ``\\n`` line ends, runs of blanks in a line made one space, ends stripped.

    A line's leading indentation is kept (replies can hold code) and its
    trailing blanks go.
    """
    text = _unicode_fixes(text).replace("\r\n", "\n").replace("\r", "\n")
    lines = []
    for line in text.split("\n"):
        body = line.lstrip(" \t")
        indent = line[: len(line) - len(body)] if body else ""
        lines.append(indent + _BLANKS.sub(" ", body).rstrip(" "))
    return "\n".join(lines).strip()


def normalize_token(token: str) -> str:
    """A word of tagged data: Unicode fixes and ends stripped; kept as is if nothing is left."""
    return _unicode_fixes(token).strip() or token


def normalize_record(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """``record`` with its input texts normalised; None when one of them becomes empty."""
    out = dict(record)
    if "words" in out and "spans" not in out:  # tagged data: text is the words joined
        out["words"] = [normalize_token(w) for w in out["words"]]
        out["text"] = " ".join(out["words"])
        return out
    for key in TEXT_KEYS:
        if isinstance(out.get(key), str):
            out[key] = normalize_text(out[key])
            if not out[key]:
                return None
    if "messages" in out:
        out["messages"] = [{**m, "content": normalize_text(m["content"])} for m in out["messages"]]
        if not all(m["content"] for m in out["messages"]):
            return None
    return out


def _key(record: Mapping[str, Any], skip: Sequence[str]) -> str:
    return json.dumps(
        {k: v for k, v in record.items() if k not in skip}, sort_keys=True, ensure_ascii=False
    )


@dataclass
class FileReport:
    """What happened to the rows of one file."""

    split: str
    path: str
    kept: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    removed_examples: dict[str, list[str]] = field(default_factory=dict)
    normalized: int = 0
    conflicting_labels: int = 0
    conflict_examples: list[list[str]] = field(default_factory=list)

    @property
    def read(self) -> int:
        """Rows in the file: kept plus removed."""
        return self.kept + sum(self.removed.values())

    def drop(self, reason: str, sources: Sequence[str]) -> None:
        """Count ``sources`` as removed for ``reason`` (the first few are kept as examples)."""
        if not sources:
            return
        self.removed[reason] = self.removed.get(reason, 0) + len(sources)
        examples = self.removed_examples.setdefault(reason, [])
        examples.extend(sources[: EXAMPLES - len(examples)])

    def to_dict(self) -> dict[str, Any]:
        return {"read": self.read, **asdict(self)}


def clean_file(
    records: Records, settings: CleanConfig, report: FileReport, *, fail_on_empty: bool = False
) -> Records:
    """Normalise and de-duplicate one file's records, counting what goes into ``report``.

    Duplicates are looked for within the file only: a row repeated in another
    split is leakage, flagged by ``find_leaks``.

    Raises:
        DataError: With ``fail_on_empty`` (``data.empty_rows: error``), naming
            the first row whose text is empty once normalised.
    """
    kept: Records = []
    seen: set[str] = set()
    answers: dict[str, tuple[str, str]] = {}  # input key -> (first answer key, its source)
    empty, repeated = [], []
    for record in records:
        if settings.normalize:
            cleaned = normalize_record(record)
            if cleaned is None:
                if fail_on_empty:
                    raise DataError(
                        f"{record['source']}: a text is empty once invisible characters "
                        "(zero-width, no-break spaces) are removed; fill it in or drop the row"
                    )
                empty.append(record["source"])
                continue
            report.normalized += cleaned != record
            record = cleaned
        key = _key(record, ("source",))
        if settings.drop_duplicates and key in seen:
            repeated.append(record["source"])
            continue
        seen.add(key)
        if any(record.get(k) is not None for k in LABEL_KEYS):
            given = _key(record, ("source", *LABEL_KEYS))
            answer = json.dumps([record.get(k) for k in LABEL_KEYS])
            first = answers.setdefault(given, (answer, record["source"]))
            if first[0] != answer:
                report.conflicting_labels += 1
                if len(report.conflict_examples) < EXAMPLES:
                    report.conflict_examples.append([first[1], record["source"]])
        kept.append(record)
    report.drop(EMPTY, empty)
    report.drop(DUPLICATE, repeated)
    report.kept = len(kept)
    return kept


@dataclass
class CleaningReport:
    """Cleaning of every file, leakage and label counts of the assembled splits."""

    settings: dict[str, Any]
    files: list[FileReport] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    leaks: dict[str, list[Leak]] = field(default_factory=dict)
    label_kind: str | None = None
    labels: dict[str, dict[str, int]] = field(default_factory=dict)
    imbalance: str | None = None

    def removed(self) -> dict[str, int]:
        """Removed rows per reason over all files."""
        total: Counter[str] = Counter()
        for f in self.files:
            total.update(f.removed)
        return dict(total)

    def drop_after_split(self, split: str, reason: str, sources: Sequence[str]) -> None:
        """Count rows removed from ``split`` once split (``data.drop_truncated``).

        They are counted on the split's file, as removed rather than kept, and
        leave the split's row count.
        """
        report = next(f for f in self.files if f.split == split)
        report.drop(reason, sources)
        report.kept -= len(sources)
        self.rows[split] = self.rows.get(split, 0) - len(sources)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: counts, and at most ``EXAMPLES`` sources per reason and split."""
        return {
            "settings": self.settings,
            "files": [f.to_dict() for f in self.files],
            "removed": self.removed(),
            "rows": self.rows,
            "leakage": {
                split: {
                    "rows": len(leaks),
                    "exact": sum(leak.exact for leak in leaks),
                    "examples": [leak.to_dict() for leak in leaks[:EXAMPLES]],
                }
                for split, leaks in self.leaks.items()
            },
            "label_kind": self.label_kind,
            "labels": self.labels,
            "imbalance": self.imbalance,
        }


def split_report(
    parts: Mapping[str, Records], files: list[FileReport], settings: CleanConfig
) -> CleaningReport:
    """The report of the assembled splits: ``files`` (from ``clean_file``), leakage, labels."""
    report = CleaningReport(settings=settings.model_dump(mode="json"), files=files)
    report.rows = {name: len(recs) for name, recs in parts.items()}
    for name in ("validation", "test"):
        if parts.get(name) and parts.get("train"):
            report.leaks[name] = find_leaks(
                parts["train"], parts[name], settings.near_duplicate_threshold
            )
    report.label_kind, report.labels = _label_table(parts)
    if report.label_kind == "label":
        report.imbalance = _imbalance(report.labels.get("train", {}), settings.imbalance_ratio)
    return report


def _label_table(parts: Mapping[str, Records]) -> tuple[str | None, dict[str, dict[str, int]]]:
    """Rows per label (single-label data) or entities per type (BIO tags), per split."""
    rows = [r for recs in parts.values() for r in recs]
    if any(r.get("label") is not None for r in rows):
        return "label", {name: label_counts(recs) for name, recs in parts.items() if recs}
    if any(r.get("tags") for r in rows):
        return "entity type", {name: _entity_counts(recs) for name, recs in parts.items() if recs}
    return None, {}


def _entity_counts(records: Records) -> dict[str, int]:
    """Entities per type: each ``B-``/``S-`` tag starts one."""
    counts = Counter(
        tag[2:] for r in records for tag in r.get("tags") or () if tag[:2] in ("B-", "S-")
    )
    return {kind: counts[kind] for kind in sort_labels(counts)}


def _imbalance(counts: Mapping[str, int], ratio: float) -> str | None:
    """A warning when the commonest label has ``ratio`` times the rows of the rarest."""
    if len(counts) < 2:
        return None
    common = max(counts, key=counts.__getitem__)
    rare = min(counts, key=counts.__getitem__)
    times = counts[common] / counts[rare]
    if times < ratio:
        return None
    return (
        f"labels are imbalanced: {common!r} has {counts[common]:,} training rows, {rare!r} "
        f"{counts[rare]:,} ({times:.1f}x, data.clean.imbalance_ratio is {ratio:g}); consider "
        "loss.class_weights or more rows of the rare labels"
    )


def summary_paragraph(report: CleaningReport) -> str:
    """One paragraph for the training log: rows read and removed, leakage, labels."""
    parts = [_file_summary(f) for f in report.files]
    held_out = [s for s in ("validation", "test") if report.rows.get(s)]
    leaked = [
        f"{len(report.leaks[s]):,} of {report.rows[s]:,} {s} rows"
        + (f" ({sum(leak.exact for leak in report.leaks[s]):,} exactly)" if report.leaks[s] else "")
        for s in held_out
        if report.leaks.get(s)
    ]
    if leaked:
        parts.append(" and ".join(leaked) + " repeat training rows (leakage; flagged, kept)")
    elif report.leaks:
        parts.append(f"no {'/'.join(report.leaks)} row repeats a training row")
    if report.label_kind and report.labels.get("train"):
        counts = report.labels["train"]
        shown = " / ".join(f"{n:,} {label}" for label, n in counts.items())
        what = "labels" if report.label_kind == "label" else "entities"
        tail = ""
        if report.label_kind == "label":
            times = max(counts.values()) / min(counts.values())
            tail = f" (imbalanced, {times:.1f}x)" if report.imbalance else " (balanced)"
        parts.append(f"train {what} {shown}{tail}")
    return "data cleaning: " + "; ".join(parts)


def _file_summary(f: FileReport) -> str:
    said = [f"{f.read:,} {f.split} rows read from {Path(f.path).name}"]
    said += [f"{n:,} {_REASON_WORDS.get(r, r)} dropped" for r, n in f.removed.items()]
    if f.conflicting_labels:
        said.append(f"{f.conflicting_labels:,} with conflicting labels kept")
    if f.normalized:
        said.append(f"text of {f.normalized:,} normalised")
    return ", ".join(said)


_REASON_WORDS = {
    EMPTY: "empty",
    DUPLICATE: "exact duplicates",
    LABEL_NOT_LISTED: "with a label not in data.labels",
    TRUNCATED: "with the answer cut by the length limit",
}
