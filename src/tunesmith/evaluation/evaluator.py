"""The full evaluation of one checkpoint: quality, speed, memory, size, robustness, forgetting.

One function answers what a reviewer asks of a fine-tuned model before it
ships: how good (the task's metrics and loss), how fast (latency p50/p95 at
batch 1, throughput in samples and real tokens per second at a served batch
size, both after warm-up), how heavy (peak memory of the evaluation pass,
checkpoint size on disk, parameters), how brittle (the metric under seeded
typos, case flips, word swaps and deletions, and the drop against clean on the
same examples) and, when the run had a reference task, how much it forgot.
``tunesmith eval --full`` prints it and writes ``evaluation.json`` in the run
folder, where ``tunesmith report`` and ``tunesmith compare`` read it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.data.batching import Collator, FeatureDataset
from tunesmith.data.perturb import KINDS, perturb_records
from tunesmith.errors import ConfigError
from tunesmith.evaluation.memory import PeakMemory
from tunesmith.evaluation.speed import forward_latency, make_batches
from tunesmith.runs.load import load_checkpoint, records_for
from tunesmith.tasks.inference import evaluate_dataset

EVALUATION_FILE = "evaluation.json"


@dataclass
class EvalOptions:
    """What the full evaluation measures and how much of it.

    Attributes:
        batch_size: The served batch size: evaluation pass and throughput.
        latency_batches: Timed batches at batch 1 and at ``batch_size``.
        warmup: Untimed passes before timing.
        kinds: Perturbation kinds of the robustness check (empty: skip it).
        strengths: Share of words perturbed, per kind.
        robustness_samples: Examples the robustness check uses (seeded; None: all).
        seed: Seed of the robustness sample and the perturbations.
        threads: Torch CPU threads while timing (None: as set).
    """

    batch_size: int = 32
    latency_batches: int = 20
    warmup: int = 2
    kinds: Sequence[str] = KINDS
    strengths: Sequence[float] = (0.1, 0.3)
    robustness_samples: int | None = 500
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ConfigError(
                f"unknown perturbation {', '.join(unknown)}; known: {', '.join(KINDS)}"
            )
        if any(not 0 <= s <= 1 for s in self.strengths):
            raise ConfigError(f"perturbation strengths must be in [0, 1], got {self.strengths}")


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | None = None,
    *,
    split: str | None = None,
    options: EvalOptions | None = None,
    trust_remote_code: bool = False,
    allow_unsafe_weights: bool = False,
) -> dict[str, Any]:
    """The full evaluation of a ``best/``/``final/`` folder on a data file or a split of its run."""

    opts = options or EvalOptions()
    folder = Path(checkpoint)
    cfg, task, model, tokenizer, labels = load_checkpoint(
        folder, trust_remote_code=trust_remote_code, allow_unsafe_weights=allow_unsafe_weights
    )
    records = records_for(task, cfg, folder, data, split)
    label2id = {lab: i for i, lab in enumerate(labels)}
    task.check_labels(records, label2id, split or "evaluation")
    collator = Collator(tokenizer.pad_token_id, tokenizer.padding_side)
    dataset = FeatureDataset(task.encode(records, tokenizer, label2id))
    device = next(model.parameters()).device
    with PeakMemory(device) as peak:
        metrics, _ = evaluate_dataset(model, task, dataset, collator, labels, opts.batch_size)
    assert peak.reading is not None
    metric = cfg.eval.metric
    report: dict[str, Any] = {
        "checkpoint": str(folder),
        "data": data if data is not None else f"{split} split",
        "examples": len(records),
        "metric": metric,
        "higher_is_better": cfg.higher_is_better(),
        "metrics": metrics,
        "peak_memory": vars(peak.reading),
        "size": checkpoint_size(folder),
        "parameters": parameter_counts(model, folder),
    }
    report |= speed(model, task, dataset.features, collator, opts)
    if opts.kinds and opts.strengths:
        report["robustness"] = robustness(
            model,
            task,
            tokenizer,
            collator,
            records,
            labels,
            metric,
            opts,
            higher_is_better=cfg.higher_is_better(),
        )
    forgetting = run_summary(folder).get("forgetting")
    if forgetting:
        report["forgetting"] = forgetting
    return report


def speed(
    model: torch.nn.Module,
    task: Any,
    features: Sequence[Mapping[str, Any]],
    collator: Collator,
    opts: EvalOptions,
) -> dict[str, Any]:
    """Latency at batch 1 and throughput at ``opts.batch_size`` (samples/s, real tokens/s).

    Multi-task data is timed on its first task's examples: one batch must go
    through one head.
    """
    timed = _one_task(features)
    held = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        out: dict[str, Any] = {}
        for name, size in (("latency_bs1", 1), ("throughput", opts.batch_size)):
            batches = make_batches(timed, collator, size, opts.latency_batches)
            latency = forward_latency({"m": model}, batches, task.model_inputs, warmup=opts.warmup)
            entry = latency["m"].as_dict()
            tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            seconds = entry["ms_per_example"] * sum(len(b["input_ids"]) for b in batches) / 1000
            entry["real_tokens_per_s"] = round(tokens / seconds, 1) if seconds > 0 else None
            out[name] = entry
        return out
    finally:
        torch.set_num_threads(held)


def robustness(
    model: torch.nn.Module,
    task: Any,
    tokenizer: Any,
    collator: Collator,
    records: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    metric: str,
    opts: EvalOptions,
    *,
    higher_is_better: bool = True,
) -> dict[str, Any]:
    """The metric on a seeded sample, clean and under each perturbation, and the drops.

    ``drop`` is how much worse than clean (positive = worse, whichever the
    metric's direction); ``mean_drop`` averages the kinds at each strength.
    """
    sample = list(records)
    if opts.robustness_samples is not None and len(sample) > opts.robustness_samples:
        sample = random.Random(opts.seed).sample(sample, opts.robustness_samples)
    label2id = {lab: i for i, lab in enumerate(labels)}

    def score(rows: Sequence[Mapping[str, Any]]) -> float:
        data = FeatureDataset(task.encode(rows, tokenizer, label2id))
        metrics, _ = evaluate_dataset(model, task, data, collator, labels, opts.batch_size)
        return float(metrics[metric])

    clean = score(sample)
    sign = 1.0 if higher_is_better else -1.0
    kinds: dict[str, dict[str, Any]] = {}
    for kind in opts.kinds:
        kinds[kind] = {}
        for rate in opts.strengths:
            value = score(perturb_records(sample, kind, rate, opts.seed))
            kinds[kind][str(rate)] = {"metric": value, "drop": sign * (clean - value)}
    mean_drop = {
        str(rate): sum(kinds[k][str(rate)]["drop"] for k in kinds) / len(kinds)
        for rate in opts.strengths
    }
    return {
        "examples": len(sample),
        "clean": clean,
        "kinds": kinds,
        "mean_drop": mean_drop,
    }


def checkpoint_size(folder: Path) -> dict[str, float]:
    """Weights and whole-folder size on disk in MB (10^6 bytes)."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    weights = sum(p.stat().st_size for p in files if p.suffix in (".safetensors", ".bin"))
    return {
        "weights_mb": round(weights / 1e6, 3),
        "folder_mb": round(sum(p.stat().st_size for p in files) / 1e6, 3),
    }


def parameter_counts(model: torch.nn.Module, folder: Path) -> dict[str, Any]:
    """Parameters of the loaded model, and how many the run trained (from its summary)."""
    summary = run_summary(folder)
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trained": summary.get("trainable_parameters"),
        "trained_percent": summary.get("trainable_percent"),
    }


def run_summary(folder: Path) -> dict[str, Any]:
    """The ``summary.json`` of the checkpoint's run folder, or {} when there is none."""
    path = Path(folder).resolve().parent / "summary.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {}


def _one_task(features: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    if not features or "task_id" not in features[0]:
        return list(features)
    first = features[0]["task_id"]
    return [f for f in features if f["task_id"] == first]


def write_evaluation(report: Mapping[str, Any], checkpoint: str | Path) -> Path:
    """Save ``report`` as ``evaluation.json`` in the checkpoint's run folder."""
    path = Path(checkpoint).resolve().parent / EVALUATION_FILE
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return path


def format_evaluation(report: Mapping[str, Any]) -> str:
    """The evaluation as readable lines (what ``tunesmith eval --full`` prints)."""
    metric = report["metric"]
    m = report["metrics"]
    lat, thr = report["latency_bs1"], report["throughput"]
    size, params, peak = report["size"], report["parameters"], report["peak_memory"]
    lines = [
        f"{report['checkpoint']} on {report['data']} ({report['examples']} examples)",
        "  quality     " + "  ".join(f"{k} {_num(v)}" for k, v in m.items() if "/" not in k),
        f"  latency     batch 1: p50 {lat['p50_ms']:.2f} ms, p95 {lat['p95_ms']:.2f} ms",
        f"  throughput  batch {thr['batch_size']}: {thr['examples_per_s']:.1f} samples/s, "
        f"{thr['real_tokens_per_s']:.0f} real tokens/s (p50 {thr['p50_ms']:.1f} ms/batch)",
        f"  memory      peak {peak['peak_mb']:.0f} MiB during evaluation "
        f"(+{peak['added_mb']:.0f} MiB, {peak['device']}, {peak['method']})",
        f"  size        weights {size['weights_mb']:.2f} MB, folder {size['folder_mb']:.2f} MB",
        f"  parameters  {params['total']:,} in the model"
        + (f", {params['trained']:,} trained" if params.get("trained") is not None else ""),
    ]
    rob = report.get("robustness")
    if rob:
        lines.append(
            f"  robustness  {metric} on {rob['examples']} examples: clean {rob['clean']:.4f}"
        )
        for kind, by_rate in rob["kinds"].items():
            cells = ", ".join(
                f"{float(r):.0%}: {v['metric']:.4f} (drop {v['drop']:+.4f})"
                for r, v in by_rate.items()
            )
            lines.append(f"    {kind:<7} {cells}")
        mean = ", ".join(f"{float(r):.0%}: {d:+.4f}" for r, d in rob["mean_drop"].items())
        lines.append(f"    mean drop {mean}")
    forgetting = report.get("forgetting")
    if forgetting:
        lines.append("  forgetting  " + "  ".join(f"{k} {_num(v)}" for k, v in forgetting.items()))
    return "\n".join(lines)


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
