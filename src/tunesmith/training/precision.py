"""Choosing the numeric precision for this machine.

bf16 autocast is a real speed-up only where the hardware runs bf16 natively
(recent GPUs; CPUs with AVX-512-BF16/AMX). On an AVX2-only CPU a bf16 matmul
runs ~90x slower than fp32, so ``auto`` never picks it there, and asking for it
explicitly gets a warning.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tunesmith.errors import ConfigError
from tunesmith.training.deepspeed_cpu import process_group_handlers
from tunesmith.training.sharding import check_joined, enable_cpu_fsdp, join_cpu_processes

log = logging.getLogger(__name__)


def cpu_bf16_native() -> bool:
    """Whether this CPU runs bf16 matmuls natively (oneDNN's own check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_capability() -> str:
    """The SIMD level torch dispatches to on this CPU ("AVX2", "AVX512", ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:
        return "unknown"


def resolve_precision(requested: str, *, cuda: bool | None = None) -> str:
    """Map ``train.precision`` to accelerate's ``mixed_precision`` (no | bf16 | fp16).

    Args:
        requested: auto | fp32 | bf16 | fp16.
        cuda: Whether training runs on a CUDA GPU (default: detected).

    Raises:
        ConfigError: fp16 without a GPU (CPU autocast has no fp16 loss scaling).
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if requested == "fp32":
        return "no"
    if requested == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_bf16_native() else "no"
    if requested == "fp16":
        if not cuda:
            raise ConfigError(
                "train.precision: fp16 needs a CUDA GPU; use fp32 or bf16 (or auto) on CPU"
            )
        return "fp16"
    if not cuda and not cpu_bf16_native():
        log.warning(
            "bf16 requested but this CPU (%s) has no native bf16: a bf16 matmul just ran "
            "%.0fx slower than fp32 here, so training will be many times slower "
            "(set train.precision=auto or fp32)",
            cpu_capability(),
            bf16_slowdown(),
        )
    return "bf16"


def bf16_slowdown(shape: tuple[int, int, int] = (512, 384, 1536), repeats: int = 2) -> float:
    """Measured time of a bf16 matmul over an fp32 one on this CPU (best of ``repeats``).

    The default shape is a small encoder's feed-forward layer on a batch of
    512 tokens (small matmuls hide the gap). Takes about a second where bf16 is
    emulated; the number makes the warning concrete instead of generic.
    """
    import time

    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)

    def best(dtype: torch.dtype) -> float:
        x, y = a.to(dtype), b.to(dtype)
        torch.mm(x, y)  # warm-up: kernel selection
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.bfloat16) / max(best(torch.float32), 1e-9)


def new_accelerator(mixed_precision: str, *, find_unused_parameters: bool = False) -> Any:
    """An ``accelerate.Accelerator`` for one run, even when an earlier run used another precision.

    accelerate keeps its state in process-wide singletons and refuses a second
    Accelerator with a different ``mixed_precision`` (a notebook training twice
    hits this). The per-run parts (AcceleratorState, GradientState) are reset;
    the process-group part (PartialState) is kept, so ``accelerate launch``
    runs are unaffected.

    ``find_unused_parameters``: DDP tolerates parameters without a gradient in
    a step (multi-task: a batch runs one head; costs an extra graph traversal).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs

    for state in (AcceleratorState, GradientState):
        reset = getattr(state, "_reset_state", None)
        if callable(reset):
            reset()
    handlers = (
        [DistributedDataParallelKwargs(find_unused_parameters=True)]
        if find_unused_parameters
        else []
    )
    handlers += process_group_handlers()  # DeepSpeed on CPU processes: name gloo
    join_cpu_processes()
    accelerator = Accelerator(mixed_precision=mixed_precision, kwargs_handlers=handlers)
    check_joined(accelerator)
    enable_cpu_fsdp(accelerator)
    return accelerator


def eval_autocast(requested: str, device: torch.device) -> Any:
    """The autocast a run's validation used on this machine, for ``eval`` of its checkpoints.

    Why: ``tunesmith eval`` must reproduce the validation numbers the run
    logged, and a run under bf16 (``auto`` picks it on hardware with native
    bf16) validated under bf16 autocast. An explicit bf16 on a CPU without
    native bf16 evaluates in fp32: it would only be many times slower.
    """
    from contextlib import nullcontext

    cuda = device.type == "cuda"
    if requested == "fp16" and not cuda:
        return nullcontext()
    if requested == "bf16" and not cuda and not cpu_bf16_native():
        return nullcontext()
    mode = resolve_precision(requested, cuda=cuda)
    if mode == "no":
        return nullcontext()
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
