"""A Weights & Biases run fed from the metrics log (``train.trackers: [wandb]``).

Offline by default: the run is written under ``RUN_DIR/wandb/`` and needs no
account (``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later);
``WANDB_MODE=online`` (with ``WANDB_API_KEY``) logs live instead. The project
is ``train.experiment``, the run is named after the run folder, its config is
the resolved config, its tags the task and method, and a comparison's or
study's runs share its parent id as their W&B group. Every numeric metric is
logged as ``<split>/<key>`` at its step.

A resumed run continues the same W&B run id; the last step logged is kept in
``RUN_DIR/wandb/last_step`` so that the steps the interrupted process already
logged, which the resumed run computes again, are not logged twice.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunesmith.config.root import Config

#: Keys of a metrics record that are not scalars to log.
_NOT_SCALARS = {"step", "epoch", "split", "time", "checkpoint"}
LAST_STEP = "last_step"


class WandbSink:
    """Logs each metrics record to one W&B run; ``run_id`` continues an earlier one."""

    def __init__(self, cfg: Config, run_dir: Path, run_id: str | None = None) -> None:
        import wandb

        self.folder = Path(run_dir) / "wandb"
        self.folder.mkdir(parents=True, exist_ok=True)
        mark = self.folder / LAST_STEP
        #: Steps up to here were logged before an interruption: a resumed run skips them.
        self.logged_before = int(mark.read_text()) if run_id is not None and mark.is_file() else -1
        self.last_step = self.logged_before
        self.run = wandb.init(
            project=cfg.train.experiment,
            name=Path(run_dir).name,
            dir=str(run_dir),
            id=run_id,
            resume="allow" if run_id is not None else None,
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
            config=cfg.model_dump(mode="json"),
            tags=[cfg.task.type, cfg.method.name],
            group=cfg.train.tracker_parent,
            settings=wandb.Settings(console="off", silent=True),
            reinit="create_new",
        )
        self.run_id: str | None = self.run.id

    def __call__(self, record: Mapping[str, Any]) -> None:
        step = int(record.get("step", 0))
        if step <= self.logged_before:
            return
        split = str(record.get("split", "train"))
        data = {
            f"{split}/{key}": value
            for key, value in record.items()
            if key not in _NOT_SCALARS
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        }
        if data:
            self.run.log(data, step=step)
            self.last_step = max(self.last_step, step)
            (self.folder / LAST_STEP).write_text(str(self.last_step))

    def close(self, status: str = "FINISHED") -> None:
        """End the run (exit code 0 when it finished, 1 when killed or failed)."""
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
