"""Give large freed tensors back to the operating system at once (glibc's malloc).

Why: ``benchmarks/sft_memory.py`` found 3.1-3.6 GB of an SFT process's
resident memory in no tensor at all after a few steps of SmolLM2 + LoRA
(live tensors: 0.5 GB). glibc serves allocations above its *mmap threshold*
with fresh pages and returns them when freed, but raises that threshold
every time such a block is freed (up to 32 MiB on 64-bit), after which
activation-sized blocks come from the heap and stay resident after the step
that freed them; the next step's differently-shaped tensors then fragment
that heap and the process grows. Fixing the threshold (``mallopt``; it also
turns the dynamic raise off) keeps every tensor above it on its own pages:
the resident set follows the live tensors, and the step's peak with it.

The price is a page fault per fresh page of a large tensor; measured in
``docs/benchmarks.md`` (memory of an SFT step). Off with
``train.return_freed_memory: false``; nothing happens off glibc (macOS,
musl, Windows), where the allocators behave differently.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

#: ``mallopt`` parameter number of the mmap threshold (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
#: Blocks at least this large get their own pages (glibc's default start value).
THRESHOLD_BYTES = 128 * 1024

_applied: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None  # not glibc (musl has no gnu_get_libc_version)
    return libc


def return_freed_memory(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; True when it is in effect."""
    global _applied
    if _applied is not None:
        return _applied
    libc = _glibc()
    _applied = bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1)
    if _applied:
        log.debug("malloc: mmap threshold fixed at %d bytes", threshold)
    return _applied
