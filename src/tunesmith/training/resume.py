"""Resumable checkpoints: everything needed to continue a run bit-identically.

A checkpoint is a folder ``<run>/checkpoints/step-NNNNNNN/`` written atomically
(temporary folder, fsync, rename) holding::

    trainable.safetensors   every parameter the optimizer holds (the rest is the base model)
    optimizer.safetensors   the optimizer's tensors (moments, step counts), flattened
    rng-<rank>.safetensors  torch CPU and CUDA generator states of each process
    window.safetensors      an online task's window (RL: its sampling generator and the
                            rollouts of the current window with their old log-probs)
    state.json              the loop's ``TrainState.state_dict()`` (step, epoch, position
                            in the epoch's data order, early stopping, counters, the
                            sums since the last log line), scheduler, gradient scaler,
                            Python and NumPy RNG states, the optimizer's non-tensor
                            state, a fingerprint of the training data
    config.yaml             the run's config, for the compatibility check on resume

Under FSDP the weights and optimizer state are sharded: each process writes
its shards of both through ``torch.distributed.checkpoint`` into ``shards/``
(one safetensors file per process, in place of the two files above) and
loads them back in place; ``state.json`` says which layout wrote it.

Nothing is pickled: tensors go to safetensors, the rest to JSON, so loading a
checkpoint cannot run code.

This module knows the loop only through ``ResumeParts``: the ``TrainState``
and the live objects whose state a checkpoint holds (the loop imports this
module, never the reverse).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from tunesmith.config.root import Config
from tunesmith.errors import CheckpointError
from tunesmith.models.folders import finish_dir_write, staging_dir, start_dir_write
from tunesmith.training.sharding import init_optimizer_state, is_sharded, load_shards, save_shards
from tunesmith.training.state import TrainState

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE = "state.json"
WINDOW = "window.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")

#: Config keys that may differ on resume without changing what is computed.
HARMLESS_KEYS = frozenset(
    {
        "train.output_dir",
        "train.overwrite",
        "train.log_steps",
        "train.grad_norm_steps",
        "train.num_threads",
        "train.eval_batch_size",
        "train.max_bad_steps",
        "train.save_steps",
        "train.save_minutes",
        "train.save_total_limit",
        "train.gradient_checkpointing",
        "train.compile",
        "train.eval_at_start",
        # generation settings only shape what predict writes
        "generate.max_new_tokens",
        "generate.num_beams",
        "generate.num_return_sequences",
        "generate.do_sample",
        "generate.temperature",
        "generate.top_p",
        "generate.top_k",
    }
)

#: Disk space kept free beyond a checkpoint's estimated size.
DISK_MARGIN_MB = 64.0

#: A captured RNG state: Python and NumPy generators (JSON), torch generators (tensors).
RngState = tuple[dict[str, Any], dict[str, torch.Tensor]]


@dataclass
class ResumeParts:
    """What a checkpoint is written from and restored into.

    Attributes:
        cfg: The run's config (stored for the compatibility check on resume).
        state: The loop's state; restored in place.
        model: The (prepared) model; its optimized parameters are stored.
        optimizer: The (prepared) optimizer.
        scheduler: The LR scheduler (its counters are stored, its lambdas rebuilt).
        accelerator: The ``accelerate.Accelerator`` of this process.
        task: The task, whose ``window_state`` (RL: the sampling generator and the
            current rollouts) is stored in ``window.safetensors``.
    """

    cfg: Config
    state: TrainState
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    accelerator: Any
    task: Any = None


# -- the policy: when to write, what to keep --------------------------------
class Checkpointer:
    """Decides when to write resumable checkpoints and keeps the last K plus the best.

    Args:
        run_dir: The run folder; checkpoints go to ``run_dir/checkpoints``.
        every_steps: Write every N optimizer steps (None: not by step count).
        every_minutes: Write when this many minutes passed since the last one.
        keep: Newest checkpoints kept; the one at the best step is kept besides.
        fingerprint: ``data_fingerprint`` of the training split, checked on resume.
    """

    def __init__(
        self,
        run_dir: Path,
        every_steps: int | None = None,
        every_minutes: float | None = None,
        keep: int = 2,
        fingerprint: str = "",
    ) -> None:
        self.folder = Path(run_dir) / CHECKPOINTS
        self.every_steps, self.every_minutes, self.keep = every_steps, every_minutes, keep
        self.fingerprint = fingerprint
        self.last_saved: Path | None = None
        self._last_time = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether a checkpoint should be written after optimizer step ``step``."""
        if self.every_steps and step % self.every_steps == 0:
            return True
        elapsed = (time.monotonic() - self._last_time) / 60.0
        return bool(self.every_minutes) and elapsed >= self.every_minutes

    def save(self, parts: ResumeParts) -> Path:
        """Write the loop's state after its current step; prune old checkpoints."""
        target = self.folder / f"step-{parts.state.step:07d}"
        if target == self.last_saved:  # e.g. a signal right after a scheduled save
            return target
        acc = parts.accelerator
        if acc.is_main_process:
            needed = estimate_checkpoint_mb(parts.optimizer)
            check_disk_space(self.folder, needed, "a checkpoint")
        save_training_state(parts, target, self.fingerprint)
        if acc.is_main_process:
            self.prune(parts.state.stopper.best_step)
        self._last_time = time.monotonic()
        self.last_saved = target
        log.info("checkpoint: %s", target)
        return target

    def prune(self, best_step: int | None) -> None:
        """Delete all but the ``keep`` newest checkpoints and the best step's one."""
        found = list_checkpoints(self.folder.parent)
        newest = set(found[-self.keep :])
        for step, path in found:
            if (step, path) not in newest and step != best_step:
                shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (half-written ``.tmp`` folders ignored)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_checkpoint(spec: str | Path, output_dir: str | Path) -> Path:
    """The checkpoint folder ``--resume`` names: ``latest``, a run folder or a checkpoint.

    Raises:
        CheckpointError: Nothing resumable is there.
    """
    if str(spec) == "latest":
        run_dir = Path(output_dir)
    else:
        path = Path(spec)
        if (path / STATE).is_file():
            return path
        if not path.is_dir():
            raise CheckpointError(f"--resume: {path} does not exist")
        run_dir = path
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(
            f"--resume: no resumable checkpoint in {run_dir / CHECKPOINTS} "
            "(checkpoints are written every train.save_steps / train.save_minutes and on "
            "SIGINT/SIGTERM); start without --resume"
        )
    return found[-1][1]


def run_dir_of(checkpoint: Path) -> Path:
    """The run folder that holds ``checkpoint`` (``<run>/checkpoints/step-N``)."""
    return Path(checkpoint).resolve().parent.parent


# -- compatibility ----------------------------------------------------------
def config_diff(saved: Config, current: Config) -> list[str]:
    """``key: old -> new`` for every setting that changed and would change the result."""
    old, new = _flatten(saved.model_dump(mode="json")), _flatten(current.model_dump(mode="json"))
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if key not in HARMLESS_KEYS and old.get(key) != new.get(key)
    ]


def check_resumable(checkpoint: Path, cfg: Config, fingerprint: str, *, force: bool) -> None:
    """Refuse to resume when the config or the training data changed (unless ``force``).

    Raises:
        CheckpointError: One line listing the changed keys.
    """
    path = checkpoint / "config.yaml"
    # As saved (paths already resolved): Config.load would re-resolve them from here.
    saved = Config.from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), source=str(path))
    problems = config_diff(saved, cfg)
    if read_state(checkpoint).get("data_fingerprint") != fingerprint:
        problems.append("training data: the encoded training split differs from the checkpoint's")
    if problems and not force:
        raise CheckpointError(
            f"--resume: {checkpoint} was written with different settings, so the run would not "
            f"continue as it started: {'; '.join(problems)} (restore them, or pass --force)"
        )
    for problem in problems:
        log.warning("resuming despite a change (--force): %s", problem)


def data_fingerprint(features: list[dict[str, Any]]) -> str:
    """A hash of the encoded training examples (token ids and labels), order included."""
    digest = hashlib.sha256()
    for feature in features:
        digest.update(json.dumps(feature, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


# -- disk space -------------------------------------------------------------
def estimate_checkpoint_mb(optimizer: Any) -> float:
    """Size of one checkpoint: the trained weights plus AdamW's two moments per weight."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    return 3 * weight_bytes / 2**20


def check_disk_space(folder: Path, needed_mb: float, what: str) -> None:
    """Fail with a clear message before writing when the disk cannot hold ``needed_mb``.

    Raises:
        CheckpointError: Free space is below the need plus a margin.
    """
    probe = Path(folder)
    while not probe.exists():
        probe = probe.parent
    free_mb = shutil.disk_usage(probe).free / 2**20
    if free_mb < needed_mb + DISK_MARGIN_MB:
        raise CheckpointError(
            f"not enough disk space for {what} in {folder}: needs about {needed_mb:.0f} MB "
            f"(+{DISK_MARGIN_MB:.0f} MB margin), {free_mb:.0f} MB free; free some space or "
            "set train.output_dir on another disk"
        )


# -- writing and reading ----------------------------------------------------
def save_training_state(parts: ResumeParts, target: Path, fingerprint: str) -> Path:
    """Write the run's complete state to ``target`` atomically (see module docstring).

    Every process calls this; with several, their RNG states are gathered and
    the main process writes the folder.
    """
    acc = parts.accelerator
    window = parts.task.window_state() if parts.task is not None else {}
    if window and acc.num_processes > 1:
        raise CheckpointError("an online task's rollouts are checkpointed for one process only")
    rngs = [(acc.process_index, *capture_rng())]
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        rngs = gather_object(rngs)
    sharded = is_sharded(acc)
    if sharded or acc.is_main_process:  # under DDP only the main process writes them
        opt_tensors, opt_meta = _flatten_optimizer(parts.optimizer.state_dict())
        trained = trainable_state(parts.model, parts.optimizer, acc)
    if acc.is_main_process:
        tmp = start_dir_write(target)
    if sharded:  # every process writes its shards into the staging folder
        acc.wait_for_everyone()
        save_shards(_shard_names(trained, opt_tensors), staging_dir(target))
        acc.wait_for_everyone()
    if acc.is_main_process:
        if not sharded:
            save_file(_contiguous(trained), tmp / "trainable.safetensors")
            save_file(_contiguous(opt_tensors), tmp / "optimizer.safetensors")
        for rank, _, tensors in rngs:
            save_file(tensors, tmp / f"rng-{rank}.safetensors")
        if window:
            save_file(_contiguous(window), tmp / WINDOW)
        parts.cfg.save(tmp / "config.yaml")
        state = {
            **parts.state.state_dict(),
            "scheduler": _scheduler_state(parts.scheduler),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "optimizer": opt_meta,
            "rng": {str(rank): as_json for rank, as_json, _ in rngs},
            "data_fingerprint": fingerprint,
            "num_processes": acc.num_processes,
            "sharded": sharded,
        }
        (tmp / STATE).write_text(json.dumps(state, default=_json_default) + "\n")
        finish_dir_write(target)
    acc.wait_for_everyone()
    return target


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint.

    Raises:
        CheckpointError: Missing or unreadable.
    """
    path = Path(checkpoint) / STATE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable tunesmith checkpoint ({exc})") from None


def restore_training_state(
    parts: ResumeParts, checkpoint: Path
) -> tuple[RngState, list[dict[str, torch.Tensor]] | None]:
    """Load a checkpoint into freshly built ``parts`` (same config, same data).

    Returns:
        This process's RNG states, to be set by the caller rather than here:
        the data loader draws from the global generator when an epoch's
        iterator is created, so the loop sets them after re-creating the
        interrupted epoch's iterator. And the batches an online task stored
        for the rest of its window (None: none).
    """
    checkpoint = Path(checkpoint)
    state = read_state(checkpoint)
    acc = parts.accelerator
    saved_ranks = state.get("num_processes", 1)
    if saved_ranks != acc.num_processes:
        raise CheckpointError(
            f"--resume: {checkpoint} was written by {saved_ranks} process(es), this run has "
            f"{acc.num_processes}; resume with the same launch"
        )
    if state.get("sharded", False) != is_sharded(acc):
        kinds = ("sharded (FSDP)", "unsharded")
        saved, now = (kinds[0], kinds[1]) if state.get("sharded") else (kinds[1], kinds[0])
        raise CheckpointError(
            f"--resume: {checkpoint} holds {saved} training state, this run is {now}; "
            "resume with the same launch"
        )
    if state.get("sharded", False):
        _load_shards(parts, checkpoint, state["optimizer"])
    else:
        _load_trainable(parts, load_file(checkpoint / "trainable.safetensors"))
        opt_tensors = load_file(checkpoint / "optimizer.safetensors")
        parts.optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, state["optimizer"]))
    sched = parts.scheduler.state_dict()
    sched.update(state["scheduler"])
    parts.scheduler.load_state_dict(sched)
    if state.get("scaler") and acc.scaler is not None:
        acc.scaler.load_state_dict(state["scaler"])
    parts.state.load_state_dict(state)
    rank = str(acc.process_index)
    log.info(
        "resumed from %s: step %d, epoch %d, %d micro-batches into it",
        checkpoint,
        parts.state.step,
        parts.state.epoch,
        parts.state.batches_in_epoch,
    )
    window = None
    if parts.task is not None and (checkpoint / WINDOW).is_file():
        window = parts.task.restore_window_state(load_file(checkpoint / WINDOW))
    return (state["rng"][rank], load_file(checkpoint / f"rng-{rank}.safetensors")), window


def trainable_state(
    model: torch.nn.Module, optimizer: Any, accelerator: Any
) -> dict[str, torch.Tensor]:
    """Every parameter the optimizer holds, by name in the unwrapped model."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    plain = accelerator.unwrap_model(model)
    return {n: p.detach() for n, p in plain.named_parameters() if id(p) in held}


def _load_trainable(parts: ResumeParts, tensors: dict[str, torch.Tensor]) -> None:
    expected = trainable_state(parts.model, parts.optimizer, parts.accelerator)
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        names = sorted(missing or unexpected)[:3]
        raise CheckpointError(
            f"--resume: the checkpoint's trained parameters do not match this model "
            f"({'missing' if missing else 'unexpected'}: {', '.join(names)})"
        )
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name])


def _shard_names(
    trained: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """One namespace for a sharded checkpoint's tensors: weights and optimizer state."""
    return {
        **{f"trainable.{k}": v for k, v in trained.items()},
        **{f"optimizer.{k}": v for k, v in optimizer.items()},
    }


def _load_shards(parts: ResumeParts, checkpoint: Path, optimizer_meta: dict[str, Any]) -> None:
    """Load this process's shards of the weights and the optimizer state, in place.

    The optimizer state is created first (a fresh optimizer has none), so
    that its sharded tensors exist to be filled.
    """
    init_optimizer_state(parts.optimizer)
    opt_tensors, _ = _flatten_optimizer(parts.optimizer.state_dict())
    trained = trainable_state(parts.model, parts.optimizer, parts.accelerator)
    try:
        load_shards(_shard_names(trained, opt_tensors), checkpoint)
    except Exception as exc:  # DCP wraps a reader's errors in its own
        raise CheckpointError(f"--resume: {checkpoint}: cannot load its shards ({exc})") from exc
    parts.optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, optimizer_meta))


# -- RNG --------------------------------------------------------------------
def capture_rng() -> RngState:
    """Python and NumPy generator states (JSON) and torch CPU/CUDA states (tensors)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    as_json = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    return as_json, tensors


def restore_rng(as_json: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Set every generator back to the captured state."""
    version, internal, gauss = as_json["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = as_json["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# -- helpers ----------------------------------------------------------------
def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (``<param>.<key>``) and JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    meta_state: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        meta_state[str(index)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                meta_state[str(index)][key] = value
    return tensors, {"state": meta_state, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()}
        for group in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def _scheduler_state(scheduler: Any) -> dict[str, Any]:
    """The scheduler's counters (its lambdas are rebuilt from the config, not stored)."""
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat
