"""Where the memory of an SFT run goes: ``examples/sft_smollm2.yaml`` (SmolLM2-135M + LoRA).

Reads, in one process and in this order:

* **phase peaks** (RSS high-water mark, reset before each phase through
  ``/proc/self/clear_refs``): set-up (model and data), one validation pass,
  the first training step on the run's longest batch, a few more steps;
* **what lives across steps**: weights, trainable parameters, gradients and
  AdamW state (bytes of the tensors themselves);
* **what one step adds**: the tensors autograd saves for backward, by
  transformer block, LM head and "outside the model" (the loss), through
  saved-tensor hooks (``tunesmith.evaluation.activations``), and the LM head's
  output (the logits) measured by a forward hook;
* **the allocator**: resident memory not held by any live tensor after the
  step (freed blocks the C allocator keeps, libraries, Python objects).

    python benchmarks/sft_memory.py [--config examples/sft_smollm2.yaml] [--steps 3] [overrides...]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tunesmith.config.root import Config
from tunesmith.evaluation.memory import PeakMemory
from tunesmith.models.loading import quiet_transformers
from tunesmith.runs.train import setup
from tunesmith.training.activations import SavedActivations
from tunesmith.training.loop import Trainer
from tunesmith.training.monitor import rss_mb
from tunesmith.training.parts import LoopCallbacks, LoopData

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


def tensor_mib(tensors: Any) -> float:
    """MiB of the distinct storages among ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.layout is torch.strided:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values()) / MIB


def live_tensor_mib() -> float:
    """MiB of every tensor storage reachable from Python right now."""
    return tensor_mib(o for o in gc.get_objects() if isinstance(o, torch.Tensor))


def optimizer_state(optimizer: Any) -> list[torch.Tensor]:
    """The optimizer's state tensors (AdamW: step, exp_avg, exp_avg_sq per parameter)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    return [v for state in opt.state.values() for v in state.values()]


def logits_probe(model: torch.nn.Module) -> tuple[dict[str, float], Any]:
    """A forward hook on the output embeddings recording the size of what they return."""
    seen = {"mib": 0.0}
    head = model.get_output_embeddings()

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        seen["mib"] = max(seen["mib"], output.numel() * output.element_size() / MIB)
        seen["shape"] = list(output.shape)

    return seen, head.register_forward_hook(hook)


def measure(cfg: Config, steps: int) -> dict[str, Any]:
    """Every reading of the module docstring, as a dict."""
    quiet_transformers()
    report: dict[str, Any] = {"rss_start_mib": round(rss_mb())}
    with PeakMemory() as peak:
        run = setup(cfg)
    report["setup"] = peak.reading.__dict__
    callbacks = LoopCallbacks(run.metrics_log, progress=False)
    data = LoopData(run.train_set, run.val_set, run.collator, run.splits.labels)
    trainer = Trainer.for_method(
        cfg, run.task, run.model, run.method, run.accelerator, data, callbacks
    )
    plain = trainer.plain_model
    params = list(plain.parameters())
    trained = [p for p in params if p.requires_grad]
    report["weights_mib"] = round(tensor_mib([*params, *plain.buffers()]), 1)
    report["trained_mib"] = round(tensor_mib(trained), 2)
    gc.collect()
    with PeakMemory() as peak:
        trainer.evaluate()
    report["validation_pass"] = peak.reading.__dict__
    windows = trainer._epoch_windows()
    window = next(windows)
    batch = window[0]
    report["first_batch"] = {
        "shape": list(batch["input_ids"].shape),
        "real_tokens": int(batch["attention_mask"].sum()),
        "trained_tokens": int((batch["labels"] != -100).sum()),
    }
    trainer.model.train()
    seen, handle = logits_probe(plain)
    gc.collect()
    before = rss_mb()
    with PeakMemory() as peak, SavedActivations(plain) as saved:
        start = time.perf_counter()
        trainer.train_step(window, account=False)
        first_s = time.perf_counter() - start
    handle.remove()
    report["first_step"] = {**peak.reading.__dict__, "seconds": round(first_s, 2)}
    report["rss_before_step_mib"] = round(before)
    report["saved_for_backward_mib"] = {k: round(v / MIB, 1) for k, v in saved.by_group.items()}
    report["saved_total_mib"] = round(saved.total / MIB, 1)
    report["largest_saved"] = [
        {"mib": round(b / MIB, 1), "where": w, "shape": s, "dtype": d}
        for b, w, s, d in saved.biggest[:6]
    ]
    report["logits_mib"] = round(seen["mib"], 1)
    report["logits_shape"] = seen.get("shape")
    report["grads_mib"] = round(tensor_mib(p.grad for p in trained if p.grad is not None), 2)
    report["optimizer_state_mib"] = round(tensor_mib(optimizer_state(trainer.optimizer)), 2)
    with PeakMemory() as peak:
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(next(windows), account=False)
        later_s = (time.perf_counter() - start) / max(steps, 1)
    report["later_steps"] = {**peak.reading.__dict__, "seconds_per_step": round(later_s, 2)}
    gc.collect()
    live, rss = live_tensor_mib(), rss_mb()
    report["after_steps"] = {"rss_mib": round(rss), "live_tensors_mib": round(live)}
    report["not_in_tensors_mib"] = round(rss - live)
    return report


def print_table(r: dict[str, Any]) -> None:
    """The breakdown as markdown."""
    rows = [
        ("process before set-up (torch, libraries)", r["rss_start_mib"]),
        ("weights (parameters + buffers)", r["weights_mib"]),
        ("trained parameters", r["trained_mib"]),
        ("their gradients", r["grads_mib"]),
        ("AdamW state", r["optimizer_state_mib"]),
        (f"LM-head output (logits {r['logits_shape']})", r["logits_mib"]),
        ("saved for backward, total", r["saved_total_mib"]),
    ]
    rows += [(f"  saved by {k}", v) for k, v in sorted(r["saved_for_backward_mib"].items())]
    print("| part | MiB |\n|---|---|")
    for name, mib in rows:
        print(f"| {name} | {mib:,.1f} |")
    print("\n| phase | peak RSS MiB | added MiB | seconds |\n|---|---|---|---|")
    for phase in ("setup", "validation_pass", "first_step", "later_steps"):
        p = r[phase]
        secs = p.get("seconds", p.get("seconds_per_step", ""))
        print(f"| {phase} | {p['peak_mb']:,.0f} | {p['added_mb']:,.0f} | {secs} |")
    a = r["after_steps"]
    print(
        f"\nafter the steps: RSS {a['rss_mib']:,} MiB, live tensors {a['live_tensors_mib']:,} MiB,"
        f" not in tensors {r['not_in_tensors_mib']:,} MiB; first batch {r['first_batch']}"
    )
    print("largest saved tensors:", json.dumps(r["largest_saved"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "sft_smollm2.yaml")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = [
        "train.output_dir=runs/sft_memory",
        "train.overwrite=true",
        *args.overrides,
    ]
    cfg = Config.load(args.config, overrides=overrides)
    print(
        f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}, "
        f"threads {torch.get_num_threads()}",
        file=sys.stderr,
    )
    report = measure(cfg, args.steps)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
