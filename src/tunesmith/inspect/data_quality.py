"""``tunesmith data inspect``: what cleaning found and what ``data.max_length`` will cut.

Reads and cleans the data exactly as ``train`` does (the ``CleaningReport``
of ``data/cleaning.py``: rows removed per file and reason, conflicting
labels, leakage, label counts) and adds truncation: every split is
tokenised with the model's tokenizer *without* truncation, so the report can
say how many rows are longer than the limit and how many tokens that loses,
before any training time is spent. Multi-task configs get one section per
task.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config.root import Config
from tunesmith.core.tables import text_table
from tunesmith.data.cleaning import CleaningReport, FileReport, summary_paragraph
from tunesmith.errors import DataError
from tunesmith.models.loading import load_tokenizer
from tunesmith.tasks.base import Task, get_task

#: Leakage and conflict examples printed per split (the JSON keeps more).
SHOWN = 5


@dataclass
class Truncation:
    """Rows of one split longer than their limit, and the tokens that are cut."""

    split: str
    part: str  # "input", or "target" (seq2seq)
    limit: int
    rows: int = 0
    truncated: int = 0
    tokens_lost: int = 0
    max_lost: int = 0
    longest: int = 0


@dataclass
class TaskQuality:
    """The report of one task (the only one, or one of a multi-task config)."""

    task_type: str
    cleaning: CleaningReport
    truncation: list[Truncation] = field(default_factory=list)
    name: str | None = None  # the task's name in a multi-task config

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_type": self.task_type,
            "summary": summary_paragraph(self.cleaning),
            "cleaning": self.cleaning.to_dict(),
            "truncation": [asdict(t) for t in self.truncation],
        }


@dataclass
class QualityReport:
    """Every task's report; a single-task config has one, without a name."""

    tasks: list[TaskQuality]

    def to_dict(self) -> dict[str, Any]:
        """One task: its report; multi-task: ``{"task_type": "multitask", "tasks": {...}}``."""
        if len(self.tasks) == 1 and self.tasks[0].name is None:
            return self.tasks[0].to_dict()
        return {"task_type": "multitask", "tasks": {t.name: t.to_dict() for t in self.tasks}}


def inspect_data(cfg: Config) -> QualityReport:
    """Read, clean and split the data as ``train`` would, and measure the truncation."""
    task = get_task(cfg)
    tokenizer = load_tokenizer(
        cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code
    )
    subtasks: dict[str | None, Task] = getattr(task, "subtasks", None) or {None: task}
    return QualityReport([_task_quality(t, name, tokenizer) for name, t in subtasks.items()])


def _task_quality(task: Task, name: str | None, tokenizer: Any) -> TaskQuality:
    splits = task.load_splits()
    assert splits.quality is not None  # every single-task task cleans through assemble_splits
    report = TaskQuality(task.name, splits.quality, name=name)
    for split in ("train", "validation", "test"):
        records = getattr(splits, split)
        if records:
            for part, (lengths, limit) in task.token_lengths(records, tokenizer).items():
                report.truncation.append(measure(split, part, lengths, limit))
    return report


def measure(split: str, part: str, lengths: Sequence[int], limit: int) -> Truncation:
    """Count the rows of ``lengths`` beyond ``limit`` and the tokens beyond it."""
    lost = [n - limit for n in lengths if n > limit]
    return Truncation(
        split=split,
        part=part,
        limit=limit,
        rows=len(lengths),
        truncated=len(lost),
        tokens_lost=sum(lost),
        max_lost=max(lost, default=0),
        longest=max(lengths, default=0),
    )


def write_json(report: QualityReport, path: Path) -> Path:
    """Write the report as JSON to ``path`` (its folder is created).

    Raises:
        DataError: ``path`` is a folder or cannot be written.
    """
    if path.is_dir():
        raise DataError(f"data inspect --output: {path} is a folder; give a file name (.json)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(report.to_dict(), indent=1, ensure_ascii=False) + "\n"
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        raise DataError(f"data inspect --output: cannot write {path} ({err.strerror})") from None
    return path


# -- rendering ---------------------------------------------------------------------
def render(report: QualityReport) -> str:
    """The report as plain-text tables, one block per task."""
    return "\n\n".join(_render_task(t) for t in report.tasks)


def _render_task(t: TaskQuality) -> str:
    c = t.cleaning
    title = f"task {t.name} ({t.task_type})" if t.name else f"task: {t.task_type}"
    blocks = [title, summary_paragraph(c), _files_table(c.files)]
    rows = ", ".join(f"{split} {n:,}" for split, n in c.rows.items() if n)
    blocks.append(f"rows after splitting: {rows}")
    conflicts = [(f, pair) for f in c.files for pair in f.conflict_examples[:SHOWN]]
    if conflicts:
        lines = [f"  {a} and {b} ({f.split})" for f, (a, b) in conflicts]
        blocks.append("same input, different labels (kept):\n" + "\n".join(lines))
    if c.leaks:
        blocks.append(_leakage_block(c))
    if c.labels:
        blocks.append(_labels_table(c))
    if t.truncation:
        blocks.append(_truncation_table(t.truncation))
    return "\n\n".join(blocks)


def _files_table(files: Sequence[FileReport]) -> str:
    reasons = list(dict.fromkeys(r for f in files for r in f.removed))
    header = ["split", "file", "read", "kept", *(f"dropped: {r}" for r in reasons)]
    header += ["conflicting labels", "normalised"]
    rows = [
        [
            f.split,
            Path(f.path).name,
            f"{f.read:,}",
            f"{f.kept:,}",
            *(f"{f.removed.get(r, 0):,}" for r in reasons),
            f"{f.conflicting_labels:,}",
            f"{f.normalized:,}",
        ]
        for f in files
    ]
    return text_table(header, rows)


def _leakage_block(c: CleaningReport) -> str:
    threshold = c.settings["near_duplicate_threshold"]
    rows = []
    for split, leaks in c.leaks.items():
        exact = sum(leak.exact for leak in leaks)
        counts = (c.rows[split], len(leaks), exact, len(leaks) - exact)
        rows.append([split, *(f"{n:,}" for n in counts)])
    lines = [
        f"leakage: held-out rows repeating a training row (flagged, kept; near: word Jaccard "
        f">= {threshold:g})",
        text_table(["split", "rows", "flagged", "exact", "near"], rows),
    ]
    for leaks in c.leaks.values():
        lines += [
            f"  {leak.source} ~ {leak.train_source} ({leak.similarity:.3f}"
            f"{', exact' if leak.exact else ''})"
            for leak in leaks[:SHOWN]
        ]
    return "\n".join(lines)


def _labels_table(c: CleaningReport) -> str:
    splits = list(c.labels)
    names = list(dict.fromkeys(name for counts in c.labels.values() for name in counts))
    rows = [[name, *(f"{c.labels[s].get(name, 0):,}" for s in splits)] for name in names]
    what = "rows per label" if c.label_kind == "label" else "entities per type"
    text = f"{what}\n" + text_table([c.label_kind or "", *splits], rows)
    return text + (f"\nwarning: {c.imbalance}" if c.imbalance else "")


def _truncation_table(truncation: Sequence[Truncation]) -> str:
    header = ["split", "part", "limit", "rows", "truncated", "tokens lost", "max lost", "longest"]
    rows = [
        [
            t.split,
            t.part,
            str(t.limit),
            f"{t.rows:,}",
            f"{t.truncated:,}",
            f"{t.tokens_lost:,}",
            f"{t.max_lost:,}",
            f"{t.longest:,}",
        ]
        for t in truncation
    ]
    return "truncation (tokens beyond the limit are cut)\n" + text_table(header, rows)
