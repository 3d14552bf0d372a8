"""Process memory as the run summary reports it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunesmith.training.monitor import peak_rss_mb, rss_mb


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_memory_of_a_child_process_is_its_own_not_its_parents():
    """ru_maxrss survives exec: a run started from a big test runner once reported the
    runner's 2 GB as its own peak. The peak must be the new process image's."""
    ballast = bytearray(1200 * 2**20)
    ballast[::4096] = b"\1" * len(range(0, len(ballast), 4096))  # touch every page
    assert rss_mb() > 1200
    code = "from tunesmith.training.monitor import peak_rss_mb; print(peak_rss_mb())"
    child = float(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
    )
    assert 0 < child < 600, child
    del ballast


def test_peak_is_at_least_the_current_resident_memory():
    assert peak_rss_mb() >= rss_mb() * 0.99
