"""Teacher against student after distillation: task metric, size and CPU latency.

``tunesmith distill`` ends with this table, the one a user distils for: how
much of the teacher's quality the student keeps and what it buys in speed and
size. Both models run on the same split of the student's run, the latency on
the same batches, turn by turn (``evaluate/speed.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunesmith.core.tables import text_table
from tunesmith.data.batching import Collator, FeatureDataset
from tunesmith.evaluation.speed import forward_latency, make_batches
from tunesmith.models.loading import checkpoint_manifest
from tunesmith.runs.load import load_checkpoint, records_for
from tunesmith.tasks.inference import evaluate_dataset

#: Batch sizes timed: one request, and a served batch.
BATCH_SIZES = (1, 32)
REPORT_FILE = "distill_report.json"


def compare(
    student: str | Path,
    teacher: str | Path,
    *,
    split: str = "test",
    batches: int = 20,
    threads: int | None = None,
) -> dict[str, Any]:
    """Metrics, parameters, size and latency of both checkpoints on ``split``.

    Args:
        student: The distilled run's ``best/`` (or ``final/``) folder.
        teacher: The teacher checkpoint.
        split: The student run's split both are evaluated and timed on.
        batches: Timed batches per batch size.
        threads: Torch threads while timing (None: as set).
    """

    # Each checkpoint loaded once: for its metrics, its size and its latency.
    loaded = {
        name: load_checkpoint(folder)
        for name, folder in (("teacher", teacher), ("student", student))
    }
    cfg, task, _, tokenizer, labels = loaded["student"]
    records = records_for(task, cfg, student, None, split)
    label2id = {lab: i for i, lab in enumerate(labels)}
    dataset = FeatureDataset(task.encode(records, tokenizer, label2id))
    features = dataset.features
    collator = Collator(tokenizer.pad_token_id, tokenizer.padding_side)
    metric = cfg.eval.metric
    models = {name: parts[2] for name, parts in loaded.items()}
    report: dict[str, Any] = {"split": split, "metric": metric, "models": {}}
    for name, folder in (("teacher", teacher), ("student", student)):
        own_task, model = loaded[name][1], models[name]
        # Both on the student run's rows (the teacher's own run may have split otherwise).
        metrics, _ = evaluate_dataset(model, own_task, dataset, collator, labels, 64)
        report["models"][name] = {
            "checkpoint": str(folder),
            "metrics": metrics,
            "parameters": sum(p.numel() for p in model.parameters()),
            "weights_mb": checkpoint_manifest(Path(folder)).get("weights_mb"),
        }
    held = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for size in BATCH_SIZES:
            timed = forward_latency(
                models, make_batches(features, collator, size, batches), task.model_inputs
            )
            for name, latency in timed.items():
                report["models"][name][f"latency_bs{size}"] = latency.as_dict()
    finally:
        torch.set_num_threads(held)
    t, s = report["models"]["teacher"], report["models"]["student"]
    report["kept"] = s["metrics"][metric] / t["metrics"][metric] if t["metrics"][metric] else None
    for size in BATCH_SIZES:
        key = f"latency_bs{size}"
        report[f"latency_ratio_bs{size}"] = s[key]["ms_per_example"] / t[key]["ms_per_example"]
    report["parameter_ratio"] = s["parameters"] / t["parameters"]
    return report


def format_report(report: dict[str, Any]) -> str:
    """The teacher/student table ``tunesmith distill`` prints."""
    metric = report["metric"]
    sizes = [int(k.removeprefix("latency_ratio_bs")) for k in report if "latency_ratio" in k]
    head = ["", metric, "parameters", "weights MB", *(f"ms/example bs{b}" for b in sizes)]
    rows = [head]
    for name in ("teacher", "student"):
        m = report["models"][name]
        rows.append(
            [
                name,
                f"{m['metrics'][metric]:.4f}",
                f"{m['parameters']:,}",
                f"{m['weights_mb']:.1f}" if m.get("weights_mb") is not None else "-",
                *(f"{m[f'latency_bs{b}']['ms_per_example']:.2f}" for b in sizes),
            ]
        )
    kept = report["kept"]
    rows.append(
        [
            "student/teacher",
            f"{kept:.1%}" if kept is not None else "-",
            f"{report['parameter_ratio']:.2f}x",
            "",
            *(f"{report[f'latency_ratio_bs{b}']:.2f}x" for b in sizes),
        ]
    )
    return f"distillation on the {report['split']} split:\n" + text_table(rows[0], rows[1:])
