"""Deployment numbers on the fine-tuned MiniLM Rotten Tomatoes model: int8 and ONNX.

Exports the checkpoint (default ``runs/demo/best``, what ``tunesmith demo``
trains) as int8 and as ONNX into ``runs/deploy/``, and measures on the run's
held-out test reviews, with the same number of CPU threads for every runtime:

* int8 against fp32: weights on disk, p50 latency at batch 1, throughput at
  batch 32 (timed turn by turn on the same batches), test accuracy;
* ONNX Runtime against PyTorch fp32: the same latency and throughput, the
  parity check's largest logit difference, and how many test predictions agree.

Run: ``python benchmarks/deploy_rt.py [CHECKPOINT] [--threads N]``; prints markdown
tables and writes ``runs/deploy/results.json``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "deploy"


def onnx_agreement(served: Any, checkpoint: Path, onnx_file: Path, split: str) -> dict[str, Any]:
    """Share of the split's predictions where onnxruntime and PyTorch pick the same label."""
    from tunesmith.data.batching import Collator
    from tunesmith.deploy.onnx_runtime import OrtRunner, TorchRunner, ort_session
    from tunesmith.runs.load import records_for

    records = records_for(served.task, served.cfg, checkpoint, None, split)
    features = served.task.encode(records, served.tokenizer, None)
    collator = Collator(served.tokenizer.pad_token_id, served.padding_side)
    runners = (TorchRunner(served.model), OrtRunner(ort_session(onnx_file, spin=False)))
    same = worst = 0.0
    for start in range(0, len(features), 64):
        batch = collator(features[start : start + 64])
        inputs = {name: batch[name] for name in runners[1].names}
        a, b = (runner(**inputs) for runner in runners)
        same += float((a.argmax(-1) == b.argmax(-1)).sum())
        worst = max(worst, float(abs(a - b).max()))
    return {"examples": len(features), "agreement": same / len(features), "max_abs_diff": worst}


def main(checkpoint: Path, threads: int) -> None:
    from tunesmith.deploy.compare import compare_checkpoints, format_comparison
    from tunesmith.deploy.int8_export import export_int8
    from tunesmith.deploy.onnx_export import export_onnx, onnx_latency
    from tunesmith.deploy.reports import latency_table
    from tunesmith.evaluation.evaluator import EvalOptions

    torch.set_num_threads(threads)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    # The int8 folder sits in the run folder, where eval --split finds the run's splits.
    int8_dir = checkpoint.parent / "int8-bench"
    shutil.rmtree(int8_dir, ignore_errors=True)
    export_int8(checkpoint, int8_dir)
    options = EvalOptions(batch_size=32, latency_batches=30, warmup=3, threads=threads)
    int8 = compare_checkpoints(checkpoint, int8_dir, split="test", options=options)
    print(format_comparison(int8))
    done = export_onnx(checkpoint, OUT / "onnx")
    from tunesmith.runs.load import records_for

    served = done.served
    records = records_for(served.task, served.cfg, checkpoint, None, "test")
    timed = onnx_latency(
        served, done.model_file, records=records, batches=30, warmup=3, threads=threads
    )
    print(latency_table(timed))
    agree = onnx_agreement(served, checkpoint, done.model_file, "test")
    print(f"ONNX parity {done.parity.max_abs_diff:.2e}; test predictions agree {agree}")
    results = {
        "checkpoint": str(checkpoint),
        "threads": threads,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "int8": int8.as_dict(),
        "onnx": {"latency": timed, "parity": done.info["parity"], "test": agree},
        "onnx_mb": done.model_file.stat().st_size / 1e6,
    }
    (OUT / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    args = sys.argv[1:]
    count = torch.get_num_threads()
    if "--threads" in args:
        at = args.index("--threads")
        count = int(args[at + 1])
        del args[at : at + 2]
    main(Path(args[0]) if args else ROOT / "runs" / "demo" / "best", count)
