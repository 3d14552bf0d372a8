"""Turning the configured files into train / validation / test records.

Shared by every task: which files exist decides what is split off the
training file (validation when absent; test only when asked, never
implicitly), the split is seeded and stratified, and where every row went is
recorded for ``splits.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tunesmith.data.settings import DataConfig
from tunesmith.data.splits import cap_records, grouped_split, stratified_split

Records = list[dict[str, Any]]


def assemble_splits(
    data: DataConfig,
    seed: int,
    read: Callable[[str], Records],
) -> tuple[dict[str, Records], dict[str, Any], list[str]]:
    """Read the configured files and split what is missing off the training file.

    Args:
        data: The data section of the config.
        seed: Seed of the split (the run's seed).
        read: Reads one file into records (the task's column mapping applied).

    Returns:
        The records per split, the provenance written to ``splits.json`` (the
        ``source`` of every row per split) and notes worth logging.
    """
    notes: list[str] = []
    train = read(data.train)
    given = {
        name: read(path)
        for name, path in (("validation", data.validation), ("test", data.test))
        if path
    }
    want_val = 0.0 if "validation" in given else data.validation_fraction
    want_test = 0.0 if "test" in given else data.test_fraction
    if want_val or want_test:
        grouped = any(r.get("group") is not None for r in train)
        split = grouped_split if grouped else stratified_split
        idx = split(train, validation_fraction=want_val, test_fraction=want_test, seed=seed)
        parts = {name: [train[i] for i in idx[name]] for name in ("train", "validation", "test")}
        # Records without a single label (token tags) are split plainly at random.
        how = "stratified" if any(r.get("label") is not None for r in train) else "random"
        how = "grouped by first user message" if grouped else how
        for name, frac in (("validation", want_val), ("test", want_test)):
            if frac:
                notes.append(
                    f"{name}: {len(parts[name])} rows split off {data.train} "
                    f"({frac:.0%}, {how}, seed {seed})"
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
    provenance = {
        "seed": seed,
        "files": {"train": data.train, "validation": data.validation, "test": data.test},
        "rows": {name: [r["source"] for r in recs] for name, recs in parts.items()},
    }
    return parts, provenance, notes


def select_by_source(records: Records, sources: list[str]) -> Records:
    """The records whose ``source`` is listed, in the listed order (re-deriving a split)."""
    by_source = {r["source"]: r for r in records}
    return [by_source[s] for s in sources if s in by_source]
