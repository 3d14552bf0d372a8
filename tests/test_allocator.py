"""``train.return_freed_memory``: glibc's mmap threshold fixed, so large freed tensors leave."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tunesmith.training import allocator

PROBE = textwrap.dedent(
    """
    import ctypes, sys
    import torch
    from tunesmith.training.allocator import return_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
        ).split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "on":
        assert return_freed_memory()
    torch.empty(2**18).fill_(1.0)  # 1 MiB, mmapped, freed: glibc raises its threshold
    before = libc.mallinfo2().hblks
    x = torch.empty(2**18).fill_(1.0)  # the same size again: own pages, or the heap?
    print(libc.mallinfo2().hblks - before)
    """
)


def _glibc_with_mallinfo2() -> bool:
    libc = allocator._glibc()
    return libc is not None and hasattr(libc, "mallinfo2")


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc 2.33+ only")
def test_fixed_threshold_keeps_large_tensors_on_their_own_pages():
    def mmapped_blocks_added(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
        )
        return int(out.stdout.strip().splitlines()[-1])

    # glibc's default: after one 1 MiB block was freed, the next comes from the heap
    # (and stays resident when freed); with the fixed threshold it gets its own pages.
    assert mmapped_blocks_added("off") == 0
    assert mmapped_blocks_added("on") == 1
