"""``tunesmith estimate CONFIG``: parameters, memory and time of a run, before running it.

Why measured, not modelled: activation memory depends on the architecture,
the attention kernel, dropout and every lever in ``train`` (feature cache,
gradient checkpointing). Instead of a per-architecture formula the estimate
builds the run exactly as ``train`` would (same data, batches, method and
Trainer), runs a few real optimizer steps and counts:

* weights, gradients and optimizer state from the tensors' sizes (AdamW keeps
  two moments per trained parameter plus a step counter per tensor);
* activations as the bytes autograd saves for the backward pass on the
  *longest* batch (length-grouped epochs start with it), seen through
  ``torch.autograd.graph.saved_tensors_hooks``, plus the largest saved tensor
  again for the transient gradient buffers of the backward pass;
* the frozen-prefix feature cache, when it is kept in memory;
* the process's own memory (interpreter, libraries, tokenizer, tokenised
  data) measured before the model is loaded;
* a workspace part: whatever the process's measured peak during those real
  steps exceeds the parts above by (allocator slack, per-thread kernel
  buffers). It differs between machines — more threads, other kernels — which
  is why it is read off the machine rather than assumed;
* time per epoch from timed steps, scaled by the epoch's padded tokens.

With a ``Sharding`` (``--processes``/``--shard``/``--offload``) it adds what
each rank keeps of the model states, from the same parameter counts and
precision (``tunesmith.inspect.sharding``).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from tunesmith.config.root import Config
from tunesmith.data.batching import FeatureDataset, padded_tokens
from tunesmith.errors import ConfigError
from tunesmith.inspect.sharding import RankMemory, Sharding, format_per_rank, per_rank
from tunesmith.methods.quantized_base import storage_bytes
from tunesmith.models.loading import check_model_source, quiet_transformers
from tunesmith.runs.parts import build_run_parts
from tunesmith.tasks.base import get_task
from tunesmith.training.activations import SavedActivations
from tunesmith.training.loop import Trainer, accumulation_windows
from tunesmith.training.monitor import MetricsLog, peak_rss_mb, rss_mb
from tunesmith.training.parts import LoopCallbacks, LoopData
from tunesmith.training.precision import new_accelerator, resolve_precision

log = logging.getLogger(__name__)

MIB = 2**20
#: Memory parts in report order.
PARTS = (
    "weights",
    "gradients",
    "optimizer",
    "activations",
    "feature_cache",
    "runtime",
    "workspace",
)


@dataclass
class Estimate:
    """What a run will need. Sizes in bytes; ``None`` where not measured."""

    total_parameters: int
    trainable_parameters: int
    precision: str
    batch_size: int
    longest_tokens: int
    cached_blocks: int
    memory: dict[str, int] = field(default_factory=dict)
    available: int = 0
    steps_per_epoch: int = 0
    seconds_per_step: float | None = None
    seconds_per_epoch: float | None = None
    cache_seconds: float = 0.0
    per_rank: RankMemory | None = None

    @property
    def total(self) -> int:
        """Bytes of every part together: the expected peak of the training process."""
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        """Whether the total fits in the memory available to a new process."""
        return self.total <= self.available

    def as_dict(self) -> dict[str, Any]:
        """JSON-able, with the derived total and fit."""
        per_rank = self.per_rank.as_dict() if self.per_rank is not None else None
        return {**asdict(self), "per_rank": per_rank, "total": self.total, "fits": self.fits}


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the tensors' elements (a quantized QLoRA weight: its packed parts)."""
    return sum(storage_bytes(t) for t in tensors)


def optimizer_state_bytes(trainable: list[torch.nn.Parameter]) -> int:
    """AdamW's state: two moments like each parameter, one fp32 step per tensor."""
    return 2 * tensor_bytes(trainable) + 4 * len(trainable)


def estimate(
    cfg: Config,
    *,
    timed_steps: int = 3,
    progress: bool = False,
    sharding: Sharding | None = None,
) -> Estimate:
    """Build the run ``cfg`` describes, take ``1 + timed_steps`` real steps, report its needs.

    Nothing is written: no run folder, no checkpoint (a disk feature cache, if
    any, goes to ``train.output_dir/.cache`` and is deleted again). With
    ``sharding`` the result also has each rank's model states (``per_rank``).
    """
    quiet_transformers()
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    check_model_source(cfg.model.name_or_path, allow_unsafe_weights=cfg.model.allow_unsafe_weights)
    task = get_task(cfg)
    if task.online:
        raise ConfigError(
            f"estimate: task.type {task.name} trains on completions it samples during "
            "training, so a step's cost is mostly its rollouts; run a few steps "
            "(train.max_steps=3) and read generation_s and tokens_per_s in metrics.jsonl"
        )
    if sharding is not None and cfg.method.quantize_base:
        raise ConfigError(
            "estimate --processes/--shard: the per-rank arithmetic counts full-precision "
            f"weights; method.quantize_base={cfg.method.quantize_base} is not modelled"
        )
    precision = resolve_precision(t.precision)
    accelerator = new_accelerator(precision)
    runtime = rss_mb() * MIB  # everything but the model is loaded before it
    parts = build_run_parts(cfg, task)
    runtime += _data_bytes(parts.train_set, parts.val_set)
    model = parts.model
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    weights = tensor_bytes(params) + tensor_bytes(model.buffers())
    started = time.perf_counter()
    trainer = Trainer.for_method(
        cfg,
        task,
        model,
        parts.method,
        accelerator,
        LoopData(parts.train_set, FeatureDataset([]), parts.collator, parts.splits.labels),
        LoopCallbacks(MetricsLog(Path(os.devnull), enabled=False), progress=progress),
    )
    cache_seconds = time.perf_counter() - started
    cache = trainer.feature_cache
    windows = accumulation_windows(iter(trainer.loader), t.grad_accum)
    first = next(windows)  # the longest batch: the sampler puts it first
    with SavedActivations(trainer.plain_model) as saved:
        trainer.train_step(first, account=False)
    longest = max(int(b["input_ids"].shape[-1]) for b in first)
    timed, tokens, steps = 0.0, 0, 0
    for window in itertools.islice(windows, timed_steps):
        steps += 1
        start = time.perf_counter()
        trainer.train_step(window, account=False)
        timed += time.perf_counter() - start
        tokens += sum(int(b["input_ids"].numel()) for b in window)
    epoch_tokens = padded_tokens(trainer.sampler.order(), trainer.sampler.lengths, t.batch_size)
    per_token = timed / tokens if tokens else None
    memory = {
        "weights": weights,
        "gradients": tensor_bytes(trainable),
        "optimizer": optimizer_state_bytes(trainable),
        "activations": saved.total + saved.largest,
        "feature_cache": cache.nbytes if cache is not None and cache.store is not None else 0,
        "runtime": int(runtime),
    }
    memory["workspace"] = max(0, int(peak_rss_mb() * MIB) - sum(memory.values()))
    result = Estimate(
        total_parameters=sum(p.numel() for p in params),
        trainable_parameters=sum(p.numel() for p in trainable),
        precision="fp32" if precision == "no" else precision,
        batch_size=t.batch_size,
        longest_tokens=longest,
        cached_blocks=cache.frozen if cache is not None else 0,
        memory=memory,
        available=psutil.virtual_memory().available + int(rss_mb() * MIB),
        steps_per_epoch=trainer.steps_per_epoch,
        seconds_per_step=timed / steps if steps else None,
        seconds_per_epoch=per_token * epoch_tokens if per_token else None,
        cache_seconds=cache_seconds if cache is not None else 0.0,
    )
    if sharding is not None:
        result.per_rank = per_rank(
            result.total_parameters, result.trainable_parameters, result.precision, sharding
        )
    trainer.release()
    return result


def _data_bytes(*datasets: FeatureDataset) -> int:
    """The tokenised features (Python lists of ints, ~8 bytes per token and key)."""
    return sum(8 * len(v) for d in datasets for f in d.features for v in f.values() if _seq(v))


def _seq(value: Any) -> bool:
    return isinstance(value, list | tuple)


def format_estimate(e: Estimate) -> str:
    """The report ``tunesmith estimate`` prints."""
    share = e.trainable_parameters / max(1, e.total_parameters)
    lines = [
        f"parameters: {e.total_parameters:,} total, {e.trainable_parameters:,} trainable "
        f"({share:.2%})",
        f"memory ({e.precision}, batch {e.batch_size} x {e.longest_tokens} tokens at the "
        f"longest"
        + (f", bottom {e.cached_blocks} blocks cached" if e.cached_blocks else "")
        + "):",
    ]
    notes = {
        "weights": "every parameter and buffer",
        "gradients": "one per trained parameter",
        "optimizer": "AdamW: two moments per trained parameter",
        "activations": "saved for backward on the longest batch, measured",
        "feature_cache": "frozen blocks' output for every training example",
        "runtime": "interpreter, libraries, tokenizer, data; measured",
        "workspace": "allocator and kernel buffers beyond the above; measured peak",
    }
    for part in PARTS:
        lines.append(f"  {part:<12} {e.memory[part] / MIB:>9,.1f} MiB  ({notes[part]})")
    verdict = "fits" if e.fits else "DOES NOT FIT: lower train.batch_size or data.max_length"
    lines.append(
        f"  {'total':<12} {e.total / MIB:>9,.1f} MiB  of {e.available / MIB:,.0f} MiB "
        f"available: {verdict}"
    )
    if e.seconds_per_epoch is not None and e.seconds_per_step is not None:
        lines.append(
            f"time: {e.seconds_per_step:.2f} s per step (timed), about "
            f"{_duration(e.seconds_per_epoch)} per epoch of {e.steps_per_epoch:,} steps"
            + (
                f"; building the feature cache took {e.cache_seconds:.0f} s"
                if e.cached_blocks
                else ""
            )
        )
    if e.per_rank is not None:
        lines.append(format_per_rank(e.per_rank, activations=e.memory["activations"]))
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 90 else f"{minutes / 60:.1f} h"
