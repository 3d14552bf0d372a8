"""Before/after numbers of an export (int8, pruned): size on disk, latency, throughput, quality.

Both models are timed on the same batches, taking turns batch by batch
(``evaluate.speed.forward_latency``), so load from other processes on a shared
machine slows both alike and their ratio stays honest even when absolute
times drift. Quality is the evaluator's pass over the same encoded examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.core.tables import text_table
from tunesmith.data.batching import Collator, FeatureDataset
from tunesmith.evaluation.evaluator import EvalOptions, checkpoint_size
from tunesmith.evaluation.speed import forward_latency, make_batches
from tunesmith.runs.load import load_checkpoint, records_for
from tunesmith.tasks.inference import evaluate_dataset


@dataclass
class ModelNumbers:
    """One side of the comparison.

    Attributes:
        weights_mb: Weight files on disk (MB, 10^6 bytes, as the evaluator counts).
        latency_bs1_ms: Median forward time of one example.
        batch_ms: Median forward time of one batch of the served batch size.
        throughput: Examples per second at the served batch size.
        metrics: The task's metrics on the compared examples.
    """

    weights_mb: float
    latency_bs1_ms: float
    batch_ms: float
    throughput: float
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Comparison:
    """A checkpoint against a model derived from it (int8, pruned) on the same data."""

    checkpoint: str
    derived: str
    data: str
    examples: int
    metric: str
    batch_size: int
    threads: int
    before: ModelNumbers
    after: ModelNumbers
    #: What the checkpoint's weights are: fp32, or the quantized base of a QLoRA run.
    before_label: str = "fp32"

    @property
    def size_ratio(self) -> float:
        """How many times smaller the derived model's weights are."""
        return self.before.weights_mb / self.after.weights_mb

    @property
    def speedup_bs1(self) -> float:
        return self.before.latency_bs1_ms / self.after.latency_bs1_ms

    @property
    def speedup_batch(self) -> float:
        return self.after.throughput / self.before.throughput

    @property
    def metric_change(self) -> float:
        """Quantized minus fp32 value of the run's metric (negative: lower)."""
        return float(self.after.metrics[self.metric]) - float(self.before.metrics[self.metric])

    def as_dict(self) -> dict[str, Any]:
        ratios = {"size_ratio": self.size_ratio, "speedup_bs1": self.speedup_bs1}
        ratios |= {"speedup_batch": self.speedup_batch, "metric_change": self.metric_change}
        return asdict(self) | ratios


def compare_checkpoints(
    checkpoint: str | Path,
    derived: str | Path,
    data: str | None = None,
    *,
    split: str | None = None,
    options: EvalOptions | None = None,
) -> Comparison:
    """Measure ``checkpoint`` and the model ``derived`` from it on a data file or a split.

    ``split`` is a split of ``checkpoint``'s run (``splits.json`` next to it);
    ``options`` gives the served batch size, timed batches, warm-up and threads.
    """

    opts = options or EvalOptions()
    cfg, task, before, tokenizer, labels = load_checkpoint(checkpoint)
    after = load_checkpoint(derived)[2]
    records = records_for(task, cfg, checkpoint, data, split)
    label2id = {lab: i for i, lab in enumerate(labels)}
    task.check_labels(records, label2id, split or "evaluation")
    dataset = FeatureDataset(task.encode(records, tokenizer, label2id))
    collator = Collator(tokenizer.pad_token_id, tokenizer.padding_side)
    models = {"before": before, "after": after}
    timed = paired_speed(models, task, dataset.features, collator, opts)
    folders = {"before": Path(checkpoint), "after": Path(derived)}
    sides = {}
    for name, model in models.items():
        metrics, _ = evaluate_dataset(model, task, dataset, collator, labels, opts.batch_size)
        sides[name] = ModelNumbers(
            weights_mb=checkpoint_size(folders[name])["weights_mb"],
            metrics=metrics,
            **timed[name],
        )
    return Comparison(
        checkpoint=str(checkpoint),
        derived=str(derived),
        data=data if data is not None else f"{split} split",
        examples=len(records),
        metric=cfg.eval.metric,
        batch_size=opts.batch_size,
        threads=opts.threads or torch.get_num_threads(),
        **sides,
        before_label=f"{cfg.method.quantize_base} base" if cfg.method.quantize_base else "fp32",
    )


def paired_speed(
    models: Mapping[str, nn.Module],
    task: Any,
    features: Sequence[Mapping[str, Any]],
    collator: Collator,
    opts: EvalOptions,
) -> dict[str, dict[str, float]]:
    """Per model: median latency at batch 1, and median batch time and throughput at
    ``opts.batch_size``, timed turn by turn on the same batches."""
    held = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        out: dict[str, dict[str, float]] = {name: {} for name in models}
        for size in (1, opts.batch_size):
            batches = make_batches(features, collator, size, opts.latency_batches)
            timed = forward_latency(models, batches, task.model_inputs, warmup=opts.warmup)
            for name, latency in timed.items():
                if size == 1:
                    out[name]["latency_bs1_ms"] = latency.p50_ms
                if size == opts.batch_size:
                    out[name] |= {"batch_ms": latency.p50_ms, "throughput": latency.examples_per_s}
        return out
    finally:
        torch.set_num_threads(held)


def comparison_rows(c: Comparison) -> list[list[str]]:
    """Size, latency, throughput and metric rows: before, after, change (for text tables)."""
    b, a, bs = c.before, c.after, c.batch_size
    return [
        [
            "weights on disk (MB)",
            f"{b.weights_mb:.2f}",
            f"{a.weights_mb:.2f}",
            f"{c.size_ratio:.2f}x smaller",
        ],
        [
            "latency batch 1, p50 (ms)",
            f"{b.latency_bs1_ms:.2f}",
            f"{a.latency_bs1_ms:.2f}",
            f"{c.speedup_bs1:.2f}x faster",
        ],
        [f"batch {bs}, p50 (ms)", f"{b.batch_ms:.1f}", f"{a.batch_ms:.1f}", ""],
        [
            f"throughput batch {bs} (examples/s)",
            f"{b.throughput:.1f}",
            f"{a.throughput:.1f}",
            f"{c.speedup_batch:.2f}x faster",
        ],
        [c.metric, f"{b.metrics[c.metric]:.4f}", f"{a.metrics[c.metric]:.4f}", _change(c)],
    ]


def format_comparison(c: Comparison) -> str:
    """The comparison as a terminal table with one line of context above it."""
    head = (
        f"{c.checkpoint} -> {c.derived} on {c.data} "
        f"({c.examples} examples, {c.threads} CPU threads)"
    )
    return head + "\n" + text_table(["", c.before_label, "int8", "change"], comparison_rows(c))


def _change(c: Comparison) -> str:
    """Rates (0..1, not a loss) as percentage points; other metrics as a plain difference."""
    values = (c.before.metrics[c.metric], c.after.metrics[c.metric])
    if c.metric != "loss" and all(0 <= float(v) <= 1 for v in values):
        return f"{100 * c.metric_change:+.2f} points"
    return f"{c.metric_change:+.4f}"
