"""``train.return_freed_memory``: the heap's free pages go back to the system after each step."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from tunesmith.training import allocator

# Frees a heap full of activation-sized blocks, keeping the last one (it pins the
# heap's top, so free() alone cannot shrink it); prints RSS in KiB before and after.
PROBE = textwrap.dedent(
    """
    import sys
    import torch
    from tunesmith.training.allocator import release_free_memory

    def rss_kib():
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS:"))

    torch.empty(2**20).fill_(1.0)  # 4 MiB, mmapped, freed: glibc raises its threshold
    blocks = [torch.empty(2**17).fill_(1.0) for _ in range(200)]  # 200 x 512 KiB, heap
    last = blocks[-1]
    del blocks
    before = rss_kib()
    released = release_free_memory() if sys.argv[1] == "on" else False
    print(before, rss_kib(), released)
    """
)


def _rss_drop_mib(mode: str) -> tuple[float, bool]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    before, after, released = out.stdout.split()[-3:]
    return (int(before) - int(after)) / 1024, released == "True"


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc only")
def test_release_returns_freed_heap_pages():
    drop_off, _ = _rss_drop_mib("off")
    drop_on, released = _rss_drop_mib("on")
    # ~100 MiB of freed blocks sit in the heap: kept without the release, returned with it.
    assert drop_off < 10
    assert released and drop_on > 60


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc only")
def test_release_runs_after_every_optimizer_step(monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(allocator, "release_free_memory", lambda: calls.append(1) or True)
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    assert allocator.release_after_steps(optimizer)
    for _ in range(3):
        weight.sum().backward()
        optimizer.step()
    assert len(calls) == 3
