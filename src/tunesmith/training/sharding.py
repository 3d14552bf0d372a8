"""Sharded training (FSDP2 through accelerate): what the loop needs beyond DDP.

Under FSDP every parameter, gradient and optimizer moment is a ``DTensor``
of which each process holds one shard. The loop's own arithmetic on them
(per-group gradient norms, the finiteness guard), resumable checkpoints and
the plain ``best/`` / ``final/`` folders therefore need collective versions;
they live here so the loop and the checkpoint code stay readable and DDP or
one process never pays for them.

Two things accelerate and PyTorch do not do for us on CPU:

* accelerate 1.16 turns ``ACCELERATE_USE_FSDP`` into FSDP only for GPU-like
  devices; on CPU processes (gloo) it silently falls back to DDP-like
  MULTI_CPU. ``enable_cpu_fsdp`` finishes the job with the same plugin
  accelerate builds from the launch config.
* FSDP2 reduces fp32 gradients with ``ReduceOp.AVG``, which gloo has
  implemented as a sum (PyTorch issue #162338): every gradient then comes out
  world-size times too large. torch 2.13's gloo averages correctly (a
  reduce-scatter AVG of 1 and 2 gives 1.5), but the package supports older
  torch, so ``fix_gradient_reduction`` makes FSDP reduce with SUM and divide
  by the world size itself (its own divide-factor path): exact on any backend
  and any torch version.

Checkpoint shards are written with ``torch.distributed.checkpoint`` through
its safetensors storage (each process writes its own shard file, the
resharding metadata lives in the safetensors headers): nothing is pickled,
so loading a checkpoint cannot run code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    _init_optim_state,
    get_model_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from tunesmith.config.root import Config
from tunesmith.errors import ConfigError
from tunesmith.training.deepspeed_cpu import deepspeed_requested, gpu_like_device

#: Sub-folder of a checkpoint with the processes' shards.
SHARDS = "shards"


def join_cpu_processes() -> None:
    """Make accelerate count the processes of a launch on a machine without a GPU.

    accelerate 1.16 joins the processes ``torchrun`` or ``accelerate launch``
    started only when it finds a device backend or ``ACCELERATE_USE_CPU`` is
    set, and ``accelerate launch`` sets that from ``use_cpu: true`` for plain
    launches but not for an FSDP config: each process would then train alone
    and all of them race to write the same run folder. Call before the
    Accelerator exists. DeepSpeed is left alone: with ``ACCELERATE_USE_CPU``
    accelerate never turns it on (``deepspeed_cpu.process_group_handlers``
    joins its processes instead).
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and not deepspeed_requested() and not gpu_like_device():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def check_joined(accelerator: Any) -> None:
    """Refuse a launch whose processes accelerate did not join (each would train alone).

    Raises:
        ConfigError: The launcher started more processes than the run has.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(
            f"the launcher started {launched} processes but accelerate joined "
            f"{accelerator.num_processes}: each would train alone and overwrite the others' "
            "run folder. On a machine without a GPU set ACCELERATE_USE_CPU=1 (or use_cpu: "
            "true in the accelerate config)"
        )


def enable_cpu_fsdp(accelerator: Any) -> None:
    """Make an ``accelerate launch`` FSDP config take effect on CPU processes.

    accelerate builds the FSDP plugin from the launch config's environment
    but only switches to FSDP for GPU-like devices; on CPU it stays MULTI_CPU
    (plain data parallel), so a CPU run would silently not shard.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wanted and state.distributed_type == DistributedType.MULTI_CPU:
        if getattr(state, "fsdp_plugin", None) is None:
            state.fsdp_plugin = FullyShardedDataParallelPlugin()
        state.distributed_type = DistributedType.FSDP


def is_sharded(accelerator: Any) -> bool:
    """Whether this run shards its model states (FSDP).

    Not from the distributed type alone: accelerate's ``AcceleratorState``
    copies the process-level type (MULTI_CPU) back into itself whenever it is
    instantiated again, which its own helpers do mid-run, so the switch
    ``enable_cpu_fsdp`` made is forgotten there; the FSDP plugin stays.
    """
    state = accelerator.state
    if str(state.distributed_type).endswith("FSDP"):
        return True
    return getattr(state, "fsdp_plugin", None) is not None and accelerator.num_processes > 1


def fix_gradient_reduction(model: torch.nn.Module, world_size: int) -> None:
    """Reduce gradients as SUM, then divide by ``world_size`` (gloo's AVG sums: #162338).

    Applied on every backend: the divide-factor path is FSDP's own (it is the
    one it takes for fp16), and the result is the mean whichever backend runs.
    """
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        if hasattr(module, "set_force_sum_reduction_for_comms"):
            module.set_gradient_divide_factor(float(world_size))
            module.set_force_sum_reduction_for_comms(True)
        else:  # torch before 2.8: a divide factor alone selects SUM with division
            module.set_reduce_scatter_divide_factor(float(world_size))


def check_shardable(
    cfg: Config,
    task: Any,
    hooks: Sequence[Any],
    objective: Any,
    *,
    engine: str,
    problems: Sequence[str] = (),
) -> None:
    """Refuse, before training, what would break or silently differ when states are split.

    Shared by FSDP and DeepSpeed ZeRO (``engine`` names it in the message);
    ``problems`` are the engine's own, found by its caller.

    Raises:
        ConfigError: Naming the setting and what to do instead.
    """
    problems = list(problems)
    if hooks:
        problems.append(
            "a method that changes what is trained during the run (progressive unfreezing) "
            "cannot re-partition mid-run"
        )
    if not task.mixed_batches:
        problems.append(f"task.type {cfg.task.type}: batches that train one head each")
    if getattr(cfg.method, "quantize_base", None):
        problems.append("method.quantize_base: quantized weights are not partitioned")
    if getattr(objective, "regularisers", None):
        problems.append("regularize: penalties compare whole weights with a reference")
    if problems:
        raise ConfigError(
            f"{engine} does not support: "
            + "; ".join(problems)
            + ". Use data-parallel training (a launch config without it)"
        )


def regroup(
    groups: dict[str, list[torch.nn.Parameter]] | None,
    names: dict[int, str],
    model: torch.nn.Module,
) -> dict[str, list[torch.nn.Parameter]] | None:
    """The method's layer groups with each parameter replaced by its sharded successor.

    ``names``: parameter id -> name before FSDP sharded the model (it keeps
    the names and replaces the parameters).
    """
    if groups is None:
        return None
    now = dict(model.named_parameters())
    return {
        group: [now[names[id(p)]] for p in params if names.get(id(p)) in now]
        for group, params in groups.items()
    }


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor`` (itself when it is not sharded)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def group_norms(groups: dict[str, list[torch.Tensor]], device: torch.device) -> dict[str, float]:
    """L2 norm of each group of sharded gradients, in one all-reduce.

    Each process sums the squares of its shards; the sum over processes is the
    square of the norm of the whole gradient. Groups whose tensors are all
    missing are left out, as without sharding.
    """
    names = [name for name, grads in groups.items() if grads]
    if not names:
        return {}
    squares = torch.stack(
        [
            sum(
                (local(g).detach().float().pow(2).sum() for g in groups[name]),
                torch.zeros((), device=device),
            )
            for name in names
        ]
    )
    dist.all_reduce(squares, op=dist.ReduceOp.SUM)
    return dict(zip(names, squares.sqrt().tolist(), strict=True))


def all_finite(tensors: Iterable[torch.Tensor], device: torch.device) -> bool:
    """Whether every shard of every tensor is finite on every process (same answer everywhere)."""
    ok = all(bool(torch.isfinite(local(t)).all()) for t in tensors)
    flag = torch.tensor(1.0 if ok else 0.0, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state gathered on the main process, on CPU (empty elsewhere).

    Every process must call it (it is a collective). Names are the model's own
    (FSDP2 shards in place, it adds no prefix).
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def save_shards(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Write each process's shards of ``tensors`` under ``folder/shards`` (collective)."""
    writer = dcp.HuggingFaceStorageWriter(str(folder / SHARDS), save_distributed=True)
    dcp.save(_contiguous(tensors), storage_writer=writer)


def load_shards(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Fill ``tensors`` (this process's shards, in place) from ``folder/shards`` (collective)."""
    dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(folder / SHARDS)))


def init_optimizer_state(optimizer: Any) -> None:
    """Create an optimizer's (empty) state, so a checkpoint's shards can be loaded into it.

    A fresh optimizer has no moments yet; PyTorch's own helper steps it once
    with zero gradients at learning rate 0, which leaves the weights alone.
    """
    _init_optim_state(getattr(optimizer, "optimizer", optimizer))


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v if v.is_contiguous() else v.contiguous() for k, v in tensors.items()}
