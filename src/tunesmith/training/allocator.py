"""Give the memory freed during a training step back to the system (glibc's malloc).

Why: ``benchmarks/sft_memory.py`` found 3.1-3.6 GB of an SFT process's
resident memory in no tensor at all after a few steps of SmolLM2 + LoRA
(live tensors: 0.5 GB). glibc serves allocations above its *mmap threshold*
with fresh pages, but raises that threshold every time such a block is freed
(up to 32 MiB on 64-bit), after which activation-sized blocks come from the
heap and stay resident after the step that freed them; the next step's
differently-shaped tensors then fragment that heap and the process grows.

``malloc_trim(0)`` after each optimizer step hands every free page of the
heap back (glibc 2.8+ releases free pages inside the heap too, not only at its
top), so the next step starts from the live tensors. An earlier version fixed
the mmap threshold instead (every large tensor on its own pages); that gave
the same peak but cost a page fault per fresh page, every step: 1.6x slower
SFT steps and encoder steps on a 2-core AVX2 CPU, against 1.1-1.3x for the
trim (``docs/benchmarks.md``, memory of an SFT step). Off by default, since
the speed is worth more than the memory to most runs; nothing happens off
glibc (macOS, musl, Windows), where the allocators behave differently.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Any

import torch


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None  # not glibc (musl has no gnu_get_libc_version)
    return libc


def release_free_memory() -> bool:
    """Return the free pages of the malloc heap to the system; True when some were."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0) == 1)


def release_after_steps(optimizer: torch.optim.Optimizer) -> bool:
    """Call ``release_free_memory`` after every step of ``optimizer``; False off glibc.

    After the step, the step's activations and gradients of frozen paths are
    freed, so this is the point where the heap holds the most free pages and
    the fewest live ones.
    """
    if _glibc() is None:
        return False

    def _release(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
        release_free_memory()

    optimizer.register_step_post_hook(_release)
    return True
