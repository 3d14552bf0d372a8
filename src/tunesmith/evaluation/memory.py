"""Peak memory of one stretch of work: RSS on CPU, max allocated on CUDA.

The process-lifetime peak (``peak_rss_mb``) says nothing about evaluation
when training ran before it in the same process. On Linux the peak can be
reset (writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM``), so the
peak of the measured block is read exactly; where that is not possible a
background thread samples RSS every few milliseconds instead (a short spike
between samples can be missed; ``method`` says which was used).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from tunesmith.training.monitor import rss_mb, vm_hwm_mb

_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS; False where Linux does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return vm_hwm_mb() is not None


@dataclass
class PeakReading:
    """What one ``PeakMemory`` block used.

    Attributes:
        device: ``cpu`` (resident memory) or ``cuda`` (allocated tensors).
        peak_mb: The highest use during the block.
        added_mb: ``peak_mb`` minus the use when the block began: what the block itself needed.
        method: How it was read: ``vmhwm``, ``sampled`` or ``cuda``.
    """

    device: str
    peak_mb: float
    added_mb: float
    method: str


class PeakMemory:
    """Context manager measuring peak memory of its block (``reading`` after exit)."""

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.reading: PeakReading | None = None
        self._start = 0.0
        self._sampled = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device) / 2**20
            self._method = "cuda"
            return self
        self._start = rss_mb()
        if reset_peak_rss():
            self._method = "vmhwm"
        else:
            self._method = "sampled"
            self._sampled = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sampled = max(self._sampled, rss_mb())

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._method == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._method == "vmhwm":
            peak = vm_hwm_mb() or rss_mb()
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            peak = max(self._sampled, rss_mb())
        self.reading = PeakReading(
            device=self.device.type,
            peak_mb=round(peak, 1),
            added_mb=round(max(0.0, peak - self._start), 1),
            method=self._method,
        )
