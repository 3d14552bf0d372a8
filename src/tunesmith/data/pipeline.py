"""Turning the configured files into train / validation / test records.

Shared by every task: every file is cleaned as it is read
(``data/cleaning.py``), which files exist decides what is split off the
training file (validation when absent; test only when asked, never
implicitly), the split is seeded and stratified, and where every row went
(and every removed row's reason) is recorded for ``splits.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from tunesmith.config.data import DataConfig
from tunesmith.data.cleaning import CleaningReport, FileReport, clean_file, split_report
from tunesmith.data.cleaning import summary_paragraph as cleaning_summary
from tunesmith.data.splits import cap_records, grouped_split, per_class, stratified_split

Records = list[dict[str, Any]]


class Assembled(NamedTuple):
    """What ``assemble_splits`` returns."""

    #: Records per split (train, validation, test).
    parts: dict[str, Records]
    #: Written to ``splits.json``: the ``source`` of every row per split, the cleaning counts.
    provenance: dict[str, Any]
    #: Facts worth logging (splits made, caps, the cleaning paragraph).
    notes: list[str]
    #: Rows removed per file and reason, leakage, label counts.
    quality: CleaningReport


def assemble_splits(
    data: DataConfig,
    seed: int,
    read: Callable[[str, FileReport], Records],
) -> Assembled:
    """Read and clean the configured files and split what is missing off the training file.

    Args:
        data: The data section of the config.
        seed: Seed of the split (the run's seed).
        read: Reads one file into records (the task's column mapping applied),
            counting the rows it drops in the ``FileReport`` (``FileReport.drop``).
    """
    notes: list[str] = []
    files: list[FileReport] = []

    def read_clean(split: str, path: str) -> Records:
        files.append(FileReport(split, path))
        fail = data.empty_rows == "error"
        return clean_file(read(path, files[-1]), data.clean, files[-1], fail_on_empty=fail)

    train = read_clean("train", data.train)
    given = {
        name: read_clean(name, path)
        for name, path in (("validation", data.validation), ("test", data.test))
        if path
    }
    want_val = 0.0 if "validation" in given else data.validation_fraction
    want_test = 0.0 if "test" in given else data.test_fraction
    if want_val or want_test:
        grouped = any(r.get("group") is not None for r in train)
        split = grouped_split if grouped else stratified_split
        split_seed = seed if data.split_seed is None else data.split_seed
        idx = split(train, validation_fraction=want_val, test_fraction=want_test, seed=split_seed)
        parts = {name: [train[i] for i in idx[name]] for name in ("train", "validation", "test")}
        # Records without a single label (token tags) are split plainly at random.
        how = "stratified" if any(r.get("label") is not None for r in train) else "random"
        how = "grouped by first user message" if grouped else how
        for name, frac in (("validation", want_val), ("test", want_test)):
            if frac:
                notes.append(
                    f"{name}: {len(parts[name])} rows split off {data.train} "
                    f"({frac:.0%}, {how}, seed {split_seed})"
                )
    else:
        parts = {"train": train, "validation": [], "test": []}
    parts.update(given)
    if data.max_train_samples is not None and len(parts["train"]) > data.max_train_samples:
        keep = cap_records(
            list(range(len(parts["train"]))), data.max_train_samples, parts["train"], seed
        )
        notes.append(f"train: capped to {len(keep)} of {len(parts['train'])} rows")
        parts["train"] = [parts["train"][i] for i in keep]
    if data.limit_per_class is not None:
        keep = per_class(
            list(range(len(parts["train"]))), data.limit_per_class, parts["train"], seed
        )
        notes.append(
            f"train: {len(keep)} of {len(parts['train'])} rows kept, at most "
            f"{data.limit_per_class} per label (data.limit_per_class, seed {seed})"
        )
        parts["train"] = [parts["train"][i] for i in keep]
    quality = split_report(parts, files, data.clean)
    notes.append(cleaning_summary(quality))
    provenance = {
        "seed": seed,
        "split_seed": seed if data.split_seed is None else data.split_seed,
        "files": {"train": data.train, "validation": data.validation, "test": data.test},
        "rows": {name: [r["source"] for r in recs] for name, recs in parts.items()},
        "cleaning": quality.to_dict(),
    }
    return Assembled(parts, provenance, notes, quality)


def select_by_source(records: Records, sources: list[str]) -> Records:
    """The records whose ``source`` is listed, in the listed order (re-deriving a split)."""
    by_source = {r["source"]: r for r in records}
    return [by_source[s] for s in sources if s in by_source]
