"""Metrics logging: one JSON object per line, plus process memory.

``metrics.jsonl`` is the record every later tool reads (reports, compare,
plots); lines carry ``step``, ``epoch``, ``split`` and flat metric keys.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil


def rss_mb() -> float:
    """Resident memory of this process in MiB."""
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process image so far, in MiB.

    Linux's ``VmHWM`` first: ``ru_maxrss`` survives ``exec``, so a process
    started from a big parent (a test runner, a notebook) would report the
    parent's peak as its own.
    """
    hwm = vm_hwm_mb()
    if hwm is not None:
        return hwm
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def vm_hwm_mb() -> float | None:
    """This process image's peak RSS in MiB (Linux ``VmHWM``, reset by exec); else None."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.is_file() else []
    kib = [int(ln.split()[1]) for ln in lines if ln.startswith("VmHWM:")]
    return round(kib[0] / 1024, 1) if kib else None


class MetricsLog:
    """Appends metric records to ``metrics.jsonl`` (flushed per line, crash-safe).

    ``sinks`` receive every written record too (TensorBoard), on the main process only.
    """

    def __init__(
        self,
        path: Path,
        enabled: bool = True,
        sinks: Sequence[Callable[[dict[str, Any]], None]] = (),
    ) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.sinks = list(sinks)
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (non-finite floats become null: JSON has no NaN)."""
        clean = {k: _jsonable(v) for k, v in record.items()}
        clean.setdefault("time", round(time.time(), 3))
        self.records.append(clean)
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(clean) + "\n")
            for sink in self.sinks:
                sink(clean)

    def close(self, status: str = "FINISHED") -> None:
        """Close the sinks that need it (trackers end their runs with ``status``:
        FINISHED, KILLED or FAILED); closing again does nothing."""
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close(status)
        self.sinks = []

    def truncate_after(self, step: int) -> None:
        """Drop records after optimizer step ``step`` (and test results): a resumed run
        redoes them, so the file reads as if the run had never stopped."""
        if not self.path.is_file():
            return
        kept = [
            r
            for r in read_metrics(self.path)
            if r.get("step", 0) <= step and r.get("split") != "test"
        ]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 8) if math.isfinite(value) else None
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
