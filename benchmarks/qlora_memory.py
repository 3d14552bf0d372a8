"""QLoRA on MiniLM-L6: the frozen base's memory in fp32, bf16, NF4 and int8, and what it costs.

Two tables. The first loads the classifier once per format in this process
and reports the bytes of the linear weights that QLoRA quantizes and of the
whole model (tensor storage, packed parts counted), how far the quantized
encoder's output is from fp32 on real reviews, and the eval forward time of a
batch. The second trains LoRA over each base (``examples/sentiment.yaml``,
``method.name=lora``, ``method.quantize_base=...``), every run in its own
process, and reports peak RSS, real tokens/s, seconds per step and test
accuracy.

    python benchmarks/qlora_memory.py [--rows 800] [--out runs/qlora-memory] [--skip-train]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch
from _runs import ROOT, train_run

KINDS = ("fp32", "bf16", "nf4", "int8")
MIB = 2**20


def _reviews(n: int) -> list[str]:
    """The first ``n`` Rotten Tomatoes review snippets (fresh/rotten rows only)."""
    from tunesmith.config.root import Config

    cfg = Config.load(ROOT / "examples" / "sentiment.yaml")
    import pandas as pd

    frame = pd.read_csv(cfg.data.train)
    frame = frame[frame[cfg.data.label_column].isin(cfg.data.labels)]
    return [str(t) for t in frame[cfg.data.text_column].head(n)]


def weight_table(batch_size: int = 32) -> str:
    """Markdown: bytes, fidelity and forward time of the MiniLM classifier per base format."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from tunesmith.assets.locate.locate import ASSETS, locate

    from tunesmith.methods.quantized_base import quantize_base, storage_bytes, weight_bytes
    from tunesmith.models.loading import quiet_transformers

    quiet_transformers()
    folder = str(locate(ASSETS["minilm"]))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(
        _reviews(batch_size), return_tensors="pt", padding=True, truncation=True, max_length=64
    )
    torch.manual_seed(0)
    fp32 = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    linears = [
        m for n, m in fp32.named_modules() if type(m) is torch.nn.Linear and n != "classifier"
    ]
    linear_fp32 = sum(storage_bytes(m.weight) for m in linears)
    with torch.no_grad():
        reference = fp32(**batch, output_hidden_states=True).hidden_states[-1]
    mask = batch["attention_mask"].unsqueeze(-1).float()

    def pooled(hidden: torch.Tensor) -> torch.Tensor:  # the sentence embedding MiniLM is for
        return (hidden * mask).sum(1) / mask.sum(1)

    lines = [
        "| base | linear weights MiB | whole model MiB | vs fp32 | encoder output rel. error "
        f"| mean-pooled cosine to fp32 | eval forward, batch {batch_size} (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    total_fp32 = sum(weight_bytes(fp32).values())
    for kind in KINDS:
        model = copy.deepcopy(fp32)
        if kind == "bf16":
            model = model.to(torch.bfloat16)
            linear = sum(storage_bytes(m.weight) for m in linears) // 2
        elif kind in ("nf4", "int8"):
            report = quantize_base(model, kind, keep=["classifier"], device=torch.device("cpu"))
            linear = report.bytes_after
        else:
            linear = linear_fp32
        total = sum(weight_bytes(model).values())
        with torch.no_grad():
            inputs = dict(batch)
            out = model(**inputs, output_hidden_states=True).hidden_states[-1].float()
            error = ((out - reference).norm() / reference.norm()).item()
            cosine = torch.cosine_similarity(pooled(out), pooled(reference)).mean().item()
            times = []
            for _ in range(5):
                start = time.perf_counter()
                model(**inputs)
                times.append(time.perf_counter() - start)
        lines.append(
            f"| {kind} | {linear / MIB:.1f} | {total / MIB:.1f} | {total / total_fp32:.2f}x "
            f"| {error:.4f} | {cosine:.4f} | {1000 * sorted(times)[2]:.0f} |"
        )
        del model
    return "\n".join(lines)


def training_table(rows: int, out: Path) -> str:
    """Markdown: LoRA over each base, one process per run."""
    common = [
        "method.name=lora",
        "optim.lr=2e-3",
        f"data.max_train_samples={rows}",
        "train.precision=fp32",
        "train.eval_steps=1000000",
        "train.early_stopping_patience=null",
    ]
    lines = [
        "| LoRA base | peak RSS MiB | real tokens/s | s / step | test accuracy |",
        "|---|---|---|---|---|",
    ]
    for kind in ("fp32", "nf4", "int8"):
        quant = "null" if kind == "fp32" else kind
        s = train_run([*common, f"method.quantize_base={quant}"], out / f"lora-{kind}")
        if "error" in s:
            lines.append(f"| {kind} | failed: {s['error'][:80]} | | | |")
            continue
        lines.append(
            f"| {kind} | {s['peak_rss_mb']:,.0f} | {s['real_tokens_per_s']:,.0f} "
            f"| {s['train_seconds'] / s['steps']:.3f} | {100 * s['test']['accuracy']:.1f}% |"
        )
        print(f"{kind}: done", flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=800, help="training rows per LoRA run")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "qlora-memory")
    parser.add_argument("--skip-train", action="store_true", help="only the weight table")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"cpu: {torch.backends.cpu.get_cpu_capability()}, threads: {torch.get_num_threads()}")
    print(weight_table(), flush=True)
    if not args.skip_train:
        print()
        print(training_table(args.rows, args.out))


if __name__ == "__main__":
    main()
