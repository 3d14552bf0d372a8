"""The pre-flight check of a generative run: answers cut by the length limits.

Runs between loading the tokenizer and loading the model, so data that would
train on cut answers is refused in seconds, not after minutes of loading a
model (``tasks/truncation.py`` measures; this module decides and logs). The
training split is gated: above ``data.max_truncated_fraction`` cut rows the
run is refused, or with ``data.drop_truncated`` the cut rows are dropped and
counted. The validation split is measured and reported, never gated or
dropped: it trains nothing, and dropping its long rows would flatter the
metrics; a warning says when it is cut beyond the threshold.
"""

from __future__ import annotations

import logging
from typing import Any

from tunesmith.config.root import Config
from tunesmith.data.cleaning import TRUNCATED
from tunesmith.tasks.base import DataSplits, Task
from tunesmith.tasks.truncation import TruncationReport, gate

log = logging.getLogger(__name__)


def preflight(cfg: Config, task: Task, splits: DataSplits, tokenizer: Any) -> None:
    """Gate the training split on cut answers and report the validation split's.

    Tasks without free-text answers (``Task.truncation`` returns None) pass untouched.

    Raises:
        DataError: Too many training rows are cut (``tasks.truncation.gate``).
    """
    d = cfg.data
    report = task.truncation(splits.train, tokenizer)
    if report is None:
        return
    _log(report)
    dropped = gate(report, d.max_truncated_fraction, d.drop_truncated)
    if dropped:
        _drop(splits, dropped)
        log.info(
            "data.drop_truncated: dropped %d of %d training rows cut by %s=%d (first: %s)",
            len(dropped),
            len(report.rows),
            report.limit_key,
            report.limit,
            ", ".join(dropped[:3]),
        )
    if splits.validation:
        val = task.truncation(splits.validation, tokenizer)
        if val is not None:
            val.split = "validation"
            _log(val)
            if val.refuses(d.max_truncated_fraction):
                log.warning(
                    "%s (validation is not gated: raise %s for metrics over whole answers)",
                    val.cut_counts(),
                    val.limit_key,
                )


def _log(report: TruncationReport) -> None:
    log.info("pre-flight truncation check:\n  %s", "\n  ".join(report.lines()))
    if report.rows and not report.end_trained:
        log.warning("%s", report.end_line())


def _drop(splits: DataSplits, sources: list[str]) -> None:
    """Remove the rows named by ``sources`` from training and from what splits.json records."""
    gone = set(sources)
    splits.train = [r for r in splits.train if r["source"] not in gone]
    rows = splits.provenance.get("rows")
    if isinstance(rows, dict):
        rows["train"] = [r["source"] for r in splits.train]
    if splits.quality is not None:
        splits.quality.drop_after_split("train", TRUNCATED, sources)
        splits.provenance["cleaning"] = splits.quality.to_dict()
