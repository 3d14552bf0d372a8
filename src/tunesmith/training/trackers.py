"""Experiment trackers (``train.trackers``): sinks on the metrics log, started before training.

``metrics.jsonl`` stays the record of truth (reports and studies read it);
each tracker also receives every record as it is written: TensorBoard event
files, an MLflow run, a Weights & Biases run. A tracker that cannot start (its package missing, its
server unreachable) stops the run before training, in one line; one that fails
while the run goes on is logged once and dropped, and never costs the run.

The trackers' run ids are kept in ``RUN_DIR/trackers.json``: ``--resume``
continues the same MLflow and W&B runs, without the steps logged after the checkpoint
being logged twice.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from tunesmith.config.root import Config
from tunesmith.errors import ConfigError
from tunesmith.training.mlflow_sink import MLflowSink, end_run, open_parent_run
from tunesmith.training.tensorboard import TensorBoardSink
from tunesmith.training.wandb_sink import WandbSink

log = logging.getLogger(__name__)

TRACKERS_FILE = "trackers.json"


class Sink(Protocol):
    """A tracker: takes every metrics record, and is closed once at the end."""

    run_id: str | None

    def __call__(self, record: Mapping[str, Any]) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


#: name -> (the package it imports, the extra that installs it, how to start it).
_STARTERS: dict[str, tuple[str, str, Callable[[Config, Path, str | None], Sink]]] = {
    "tensorboard": ("tensorboard", "tensorboard", lambda cfg, out, _: TensorBoardSink(out)),
    "mlflow": ("mlflow", "mlflow", lambda cfg, out, run_id: MLflowSink(cfg, out, run_id)),
    "wandb": ("wandb", "wandb", lambda cfg, out, run_id: WandbSink(cfg, out, run_id)),
}


def check_packages(cfg: Config) -> None:
    """Fail in one line, before anything loads, when a tracker's package is missing."""
    for name in cfg.train.active_trackers:
        package, extra, _ = _STARTERS[name]
        if importlib.util.find_spec(package) is None:
            key = "train.tensorboard" if not cfg.train.trackers else "train.trackers"
            raise ConfigError(
                f"{key}: {name} needs the {package} package (pip install "
                f"'tunesmith[{extra}]'), or remove it"
            )


def start_trackers(cfg: Config, run_dir: Path, *, resuming: bool) -> list[GuardedSink]:
    """Start every tracker of ``cfg`` for ``run_dir`` (the same runs again when resuming).

    Raises:
        ConfigError: A tracker cannot start; says which and why.
    """
    path = Path(run_dir) / TRACKERS_FILE
    ids: dict[str, str] = json.loads(path.read_text()) if resuming and path.is_file() else {}
    sinks = []
    for name in cfg.train.active_trackers:
        _, _, start = _STARTERS[name]
        try:
            sink = start(cfg, Path(run_dir), ids.get(name))
        except Exception as err:
            for started in sinks:
                started.close("FAILED")
            raise ConfigError(
                f"train.trackers: {name} could not start ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); fix it or remove {name}"
            ) from None
        if sink.run_id is not None:
            ids[name] = sink.run_id
        sinks.append(GuardedSink(name, sink))
    if ids:
        path.write_text(json.dumps(ids, indent=1) + "\n")
    return sinks


def parent_run(cfg: Config, folder: Path, kind: str) -> str | None:
    """The MLflow run a comparison or study in ``folder`` logs its runs under, if any.

    Kept in ``folder/trackers.json``, so a comparison or study that goes on
    later keeps its runs under the same parent. None when ``mlflow`` is not
    among ``cfg``'s trackers.

    Raises:
        ConfigError: MLflow cannot be reached (before any run trains).
    """
    if "mlflow" not in cfg.train.active_trackers:
        return None
    check_packages(cfg)
    path = Path(folder) / TRACKERS_FILE
    ids = json.loads(path.read_text()) if path.is_file() else {}
    if "mlflow" not in ids:
        try:
            ids["mlflow"] = open_parent_run(cfg, Path(folder).name, kind)
        except Exception as err:
            raise ConfigError(
                f"train.trackers: mlflow could not start ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); fix it or remove mlflow"
            ) from None
        Path(folder).mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ids, indent=1) + "\n")
    return ids["mlflow"]


def end_parent_run(run_id: str | None, status: str = "FINISHED") -> None:
    """End a comparison's or study's parent run (None: nothing to end); never raises."""
    if run_id is None:
        return
    try:
        end_run(run_id, status)
    except Exception as err:
        log.warning("train.trackers: the mlflow parent run did not close cleanly (%s)", err)


class GuardedSink:
    """A tracker whose failures are logged once and end its logging, never the run."""

    def __init__(self, name: str, sink: Sink) -> None:
        self.name = name
        self.sink: Sink | None = sink

    def __call__(self, record: Mapping[str, Any]) -> None:
        if self.sink is None:
            return
        try:
            self.sink(record)
        except Exception as err:
            log.warning(
                "train.trackers: %s failed at step %s (%s: %s); it logs nothing more, "
                "metrics.jsonl keeps every record",
                self.name,
                record.get("step"),
                type(err).__name__,
                err,
            )
            self.sink = None

    def close(self, status: str = "FINISHED") -> None:
        if self.sink is None:
            return
        try:
            self.sink.close(status)
        except Exception as err:
            log.warning("train.trackers: %s did not close cleanly (%s)", self.name, err)
        self.sink = None
