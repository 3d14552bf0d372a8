"""Optional TensorBoard logging: the same scalars as ``metrics.jsonl``, as event files.

``train.trackers: [tensorboard]`` adds this sink to the metrics log; every numeric
key of a record becomes the scalar ``<split>/<key>`` at the record's step, in
``RUN_DIR/tensorboard/``. ``metrics.jsonl`` stays the record of truth (reports
and ``compare`` read it); TensorBoard is for watching a run live. It needs the
``tensorboard`` package (``pip install 'tunesmith[tensorboard]'``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Keys of a metrics record that are not scalars to plot.
_NOT_SCALARS = {"step", "epoch", "split", "time", "checkpoint"}
TENSORBOARD_DIR = "tensorboard"


class TensorBoardSink:
    """Writes each metrics record as TensorBoard scalars (flushed per record)."""

    run_id = None  # nothing to continue: a resumed run appends to the same folder

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))

    def __call__(self, record: Mapping[str, Any]) -> None:
        split = record.get("split", "train")
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key in _NOT_SCALARS or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                self.writer.add_scalar(f"{split}/{key}", value, global_step=step)
        self.writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        """Flush and close the event file (``status`` is for trackers that record it)."""
        self.writer.close()
