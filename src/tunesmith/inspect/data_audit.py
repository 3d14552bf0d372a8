"""``tunesmith data audit``: what exactly a run will train on, before it trains.

Instruction tuning fails silently when the prompt mask is wrong (the model
learns to echo prompts) or when replies are cut off by ``max_length`` (it
learns nothing). The audit encodes the training split exactly as ``train``
does and shows a few samples as rendered text with the trained tokens
marked, plus the share of trained tokens over the whole split. It applies to
tasks whose labels are per input token (causal_lm, token_classification), and
to generative tasks (causal_lm, seq2seq) it adds the pre-flight truncation
gate a run applies (``tasks/truncation.py``): answers and end tokens cut by
the length limits, the worst rows, and whether a run would be refused.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from tunesmith.config.root import Config
from tunesmith.errors import ConfigError
from tunesmith.models.loading import load_tokenizer
from tunesmith.tasks.base import get_task
from tunesmith.tasks.losses import IGNORE
from tunesmith.tasks.truncation import TruncationReport

#: Markers around trained text when the output is not a colour terminal.
OPEN, CLOSE = "[[", "]]"


@dataclass
class AuditReport:
    """Counts over the training split and a few samples as (text, trained?) runs."""

    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    untrained_examples: int = 0
    at_max_length: int = 0
    #: Raw-text documents: long ones are split into ``max_length`` pieces, never cut.
    documents: bool = False
    max_length: int = 0
    samples: list[list[tuple[str, bool]]] = field(default_factory=list)
    #: The pre-flight gate's report of the training split (generative tasks), and the
    #: settings that decide on it.
    truncation: TruncationReport | None = None
    max_truncated_fraction: float = 0.0
    drop_truncated: bool = False

    @property
    def trained_fraction(self) -> float:
        """Share of all input tokens that carry a label."""
        return self.trained_tokens / self.tokens if self.tokens else 0.0


def audit(cfg: Config, samples: int = 3, seed: int = 0) -> AuditReport:
    """Encode the training split as ``train`` would and collect the report.

    Raises:
        ConfigError: The task has neither per-token labels nor a truncation gate.
    """
    task = get_task(cfg)
    splits = task.load_splits()
    tokenizer = load_tokenizer(
        cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code
    )
    d = cfg.data
    report = AuditReport(
        max_length=d.max_length,
        truncation=task.truncation(splits.train, tokenizer),
        max_truncated_fraction=d.max_truncated_fraction,
        drop_truncated=d.drop_truncated,
    )
    label2id = {lab: i for i, lab in enumerate(splits.labels)}
    features = task.encode(splits.train, tokenizer, label2id)
    if not features or not _token_labels(features[0]):
        if report.truncation is not None:  # seq2seq: the gate, no per-token samples
            return report
        raise ConfigError(
            f"data audit shows per-token training targets; task.type {cfg.task.type} has none "
            "(it applies to causal_lm, seq2seq and token_classification)"
        )
    report.examples = len(features)
    report.documents = bool(splits.train) and "messages" not in splits.train[0]
    for f in features:
        trained = sum(lab != IGNORE for lab in f["labels"])
        report.tokens += len(f["input_ids"])
        report.trained_tokens += trained
        report.untrained_examples += trained == 0
        report.at_max_length += len(f["input_ids"]) >= cfg.data.max_length
    chosen = random.Random(seed).sample(range(len(features)), min(samples, len(features)))
    report.samples = [_runs(features[i], tokenizer) for i in sorted(chosen)]
    return report


def _token_labels(feature: dict[str, Any]) -> bool:
    labels = feature.get("labels")
    return isinstance(labels, list) and len(labels) == len(feature["input_ids"])


def _runs(feature: dict[str, Any], tokenizer: Any) -> list[tuple[str, bool]]:
    """Consecutive tokens with the same trained/untrained state, decoded together."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(feature["input_ids"], feature["labels"], strict=True):
        trained = label != IGNORE
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    return [(tokenizer.decode(ids), trained) for ids, trained in runs]


def render_audit(report: AuditReport, *, color: bool = False) -> str:
    """The samples with trained text marked (green, or ``[[...]]``), the counts, the gate."""
    lines = []
    for n, runs in enumerate(report.samples, 1):
        lines.append(f"--- sample {n} " + "-" * 40)
        text = "".join(_mark(t, trained, color) for t, trained in runs)
        lines.append(text)
    marker = "green" if color else f"{OPEN} {CLOSE}"
    if report.examples:
        lines += [
            "-" * 54,
            f"trained tokens ({marker}): {report.trained_tokens:,} of {report.tokens:,} "
            f"({report.trained_fraction:.1%}) over {report.examples:,} training examples",
            f"examples with nothing to train: {report.untrained_examples:,}; "
            + (
                f"pieces of documents split at data.max_length={report.max_length} "
                f"(nothing is cut): {report.at_max_length:,}"
                if report.documents
                else f"cut at data.max_length={report.max_length}: {report.at_max_length:,}"
            ),
        ]
    if report.truncation is not None:
        lines += ["-" * 54, *_gate_lines(report.truncation, report)]
    return "\n".join(lines)


def _gate_lines(gate: TruncationReport, report: AuditReport) -> list[str]:
    """The pre-flight gate as a run applies it: its report and its verdict."""
    threshold = report.max_truncated_fraction
    if not gate.cut:
        verdict = "a run would pass"
    elif report.drop_truncated:
        verdict = f"a run would drop the {len(gate.cut):,} cut rows (data.drop_truncated)"
    elif gate.refuses(threshold):
        verdict = (
            f"a run would be REFUSED: raise {gate.limit_key}, or set data.drop_truncated: true"
        )
    else:
        verdict = "a run would pass (cut rows within the threshold)"
    head = f"pre-flight truncation gate (data.max_truncated_fraction={threshold:g}): {verdict}"
    return [head, *(f"  {line}" for line in gate.lines())]


def _mark(text: str, trained: bool, color: bool) -> str:
    if not trained:
        return text
    return f"\x1b[1;32m{text}\x1b[0m" if color else f"{OPEN}{text}{CLOSE}"
