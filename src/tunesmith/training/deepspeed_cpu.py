"""DeepSpeed ZeRO-2/3 through accelerate on CPU processes: what the loop needs beyond DDP.

DeepSpeed runs on CPU (its CPU accelerator talks over gloo when oneCCL is
missing), but accelerate 1.16 and the loop need a few things done for it:

* **The process group.** Under ``ACCELERATE_USE_DEEPSPEED`` on a machine
  without a GPU, accelerate finds no device backend and leaves its own
  ``backend`` None: DeepSpeed still joins every process (over gloo), yet
  accelerate reports ``num_processes == 1`` on each of them, so the
  DeepSpeed batch check fails with ``train_batch_size is not equal to
  micro_batch_per_gpu * gradient_acc_step * world_size 4 != 4 * 1 * 2``.
  Naming the backend (``InitProcessGroupKwargs(backend="gloo")``) makes
  accelerate count the processes; ``process_group_handlers`` adds it.
  (``ACCELERATE_USE_CPU=1`` is no way out: with it accelerate never turns
  DeepSpeed on.)
* **The engine's settings come from the config**, not from accelerate's
  ``auto`` defaults: the micro-batch (the loader may have no ``batch_size``),
  the accumulation steps and the clipping norm (``auto`` means 1.0 whatever
  ``optim.max_grad_norm`` says). ``configure`` fills them before ``prepare``.
* **The step happens inside ``accelerator.backward``.** accelerate's engine
  wrapper reduces the gradients, clips them, steps the optimizer and zeroes
  the gradients at every backward where ``sync_gradients`` is set; the
  wrapped optimizer's ``step``/``zero_grad`` are no-ops. ZeRO keeps the
  gradients in its own partitioned buffers (``p.grad`` stays None), so the
  loop's own norms and clipping see nothing: the engine's global norm (taken
  before its clipping) replaces them (``grad_norm``). The loop's normaliser
  (summed loss over the global number of targets, times the number of
  processes) stays exact: DeepSpeed averages gradients over processes like
  DDP. For accumulation the non-final micro-batches must not be a boundary
  (``set_boundary``) and the engine must not divide the loss by the
  accumulation steps again (``backward_kwargs``).
* **ZeRO-3 and model loading.** accelerate registers the DeepSpeed config
  with transformers as soon as the Accelerator exists, so under ZeRO-3
  ``from_pretrained`` builds the model inside ``deepspeed.zero.Init``: every
  parameter is already an empty partition, and tunesmith's own loading
  steps (initialising a new head, applying the method) fail with
  ``ValueError: Fan in and fan out can not be computed for tensor with
  fewer than 2 dimensions``. ``whole_model_loading`` loads whole weights
  instead; ``prepare`` partitions them (each process holds the whole model
  until then: fine for models that fit one process, not for giant ones).
* **ZeRO-3 partitions the weights**: each process holds a slice of every
  parameter (the module's tensors are empty), so ``best/`` and ``final/``
  are written from the whole weights gathered on every process
  (``gathered_weights``).

The ``deepspeed`` library is heavy and optional: it is imported only inside
the functions that need it, and only under a DeepSpeed run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate.utils import InitProcessGroupKwargs
from accelerate.utils.imports import get_torch_accelerator_backend
from transformers.integrations import unset_hf_deepspeed_config

from tunesmith.config.root import Config

log = logging.getLogger(__name__)


def deepspeed_requested() -> bool:
    """Whether this process was launched for DeepSpeed (``accelerate launch`` or env vars)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def gpu_like_device() -> bool:
    """Whether accelerate finds a device backend of its own (CUDA, XPU, ...): it needs no help."""
    device_type, _ = get_torch_accelerator_backend()
    return device_type is not None


def process_group_handlers() -> list[Any]:
    """accelerate kwargs handlers a DeepSpeed run on CPU processes needs (empty otherwise).

    Without a named backend accelerate counts one process in each of the
    ``torchrun`` processes (see the module docstring); gloo is what
    DeepSpeed's CPU accelerator uses when oneCCL is not installed.
    """
    if not deepspeed_requested() or int(os.environ.get("LOCAL_RANK", -1)) == -1:
        return []
    if gpu_like_device():
        return []
    return [InitProcessGroupKwargs(backend="gloo")]


def is_deepspeed(accelerator: Any) -> bool:
    """Whether this run trains through a DeepSpeed engine."""
    return str(accelerator.distributed_type).endswith("DEEPSPEED")


def zero_stage(accelerator: Any) -> int:
    """The ZeRO stage of a DeepSpeed run (0 when the run is not DeepSpeed)."""
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def unsupported(accelerator: Any, cfg: Config) -> list[str]:
    """The settings of ``cfg`` a DeepSpeed run would silently not honour (empty: none)."""
    t, optim = cfg.train, cfg.optim
    problems = []
    if optim.clip_mode == "per_group" and optim.max_grad_norm is not None:
        problems.append("optim.clip_mode per_group: the engine clips the global norm only")
    on_cpu = not gpu_like_device()
    if on_cpu and (t.precision not in ("fp32", "auto") or accelerator.mixed_precision != "no"):
        problems.append(f"train.precision {t.precision}: only fp32 was verified on CPU")
    if t.feature_cache in ("memory", "disk"):
        problems.append("train.feature_cache: the engine owns the module it would swap")
    if t.save_steps is not None or t.save_minutes is not None:
        problems.append(
            "resumable checkpoints (the engine's partitioned optimizer state is not "
            "saved yet): set train.save_steps and train.save_minutes to null"
        )
    return problems


def configure(accelerator: Any, cfg: Config) -> None:
    """Fill the DeepSpeed config from ``cfg`` before ``accelerator.prepare``."""
    if not is_deepspeed(accelerator):
        return
    t, optim = cfg.train, cfg.optim
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = t.batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["gradient_clipping"] = optim.max_grad_norm or 0.0
    ds.pop("train_batch_size", None)  # derived by accelerate from the three above
    log.info(
        "training through DeepSpeed ZeRO-%d on %d processes (%s)",
        zero_stage(accelerator),
        accelerator.num_processes,
        accelerator.state.backend,
    )
    if zero_stage(accelerator) == 3:
        # Let ``accelerator.get_state_dict`` gather too (it refuses otherwise).
        ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


@contextmanager
def whole_model_loading(accelerator: Any) -> Iterator[None]:
    """Load models with whole weights under ZeRO-3 (no ``deepspeed.zero.Init``); a no-op otherwise.

    transformers partitions at load time whenever accelerate registered a
    ZeRO-3 config; the registration is lifted for the block and restored
    after (generation under ZeRO-3 needs it to keep processes in step).
    """
    if zero_stage(accelerator) != 3:
        yield
        return
    plugin = accelerator.state.deepspeed_plugin
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def set_boundary(accelerator: Any, sync: bool) -> None:
    """Tell the engine whether this micro-batch ends the step (call before each backward).

    accelerate's engine wrapper steps at every backward where
    ``sync_gradients`` is set; the loop accumulates with ``no_sync`` instead
    of ``accelerator.accumulate``, so without this the engine would step after
    every micro-batch.
    """
    if is_deepspeed(accelerator):
        accelerator.gradient_state._set_sync_gradients(sync)


def backward_kwargs(accelerator: Any) -> dict[str, Any]:
    """Extra arguments of ``accelerator.backward``: the loop normalises the loss itself.

    The engine would divide every micro-batch's loss by the accumulation
    steps again; the loop's loss is already divided by the window's global
    number of targets.
    """
    return {"scale_wrt_gas": False} if is_deepspeed(accelerator) else {}


def grad_norm(accelerator: Any, model: Any) -> float:
    """The engine's global gradient norm of the step it just took (before clipping)."""
    norm = model.get_global_grad_norm() if hasattr(model, "get_global_grad_norm") else None
    if norm is None:
        return float("nan")
    return float(norm.item() if hasattr(norm, "item") else norm)


def gathered_weights(accelerator: Any, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole weights of a ZeRO-3 model, on CPU, for ``best/`` and ``final/`` (None otherwise).

    Every process must call it (it gathers every parameter); every process
    gets the same full copy, the main one writes the folder. ZeRO-2 keeps the
    whole weights on every process, so the model is saved from its own tensors.
    """
    if zero_stage(accelerator) != 3:
        return None
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
