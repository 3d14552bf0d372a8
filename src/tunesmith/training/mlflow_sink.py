"""An MLflow run fed from the metrics log (``train.trackers: [mlflow]``).

Where it logs is MLflow's own choice: ``MLFLOW_TRACKING_URI`` (a server such
as ``http://127.0.0.1:5000``, or a database such as ``sqlite:///mlflow.db``,
MLflow's default in the working directory). The run is
created in the experiment ``train.experiment`` and named after the run folder,
with the resolved config as flattened params (``optim.lr``), tags naming the
task, method and model, every numeric metric as ``<split>/<key>`` at its
step, and at the end ``config.yaml``, ``metrics.jsonl``, ``summary.json``
(and ``report.html`` when present; ``best/`` with
``train.log_best_checkpoint``) as artifacts.

The client API with an explicit run id is used throughout, never MLflow's
"active run": nothing global is changed in the process that trains.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunesmith.config.root import Config

#: Keys of a metrics record that are not scalars to log.
_NOT_SCALARS = {"step", "epoch", "split", "time", "checkpoint"}
#: MLflow's limits: params per call, characters per param value.
_PARAMS_PER_CALL = 100
_PARAM_CHARS = 6000
_NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9_\-. :/]")
#: Files of the run folder uploaded at the end, when they exist.
_ARTIFACTS = ("config.yaml", "metrics.jsonl", "summary.json", "report.html")


def metric_name(split: str, key: str) -> str:
    """``<split>/<key>`` with characters MLflow refuses in names replaced by ``_``."""
    return _NOT_IN_NAMES.sub("_", f"{split}/{key}")


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config sections as ``section.key`` -> text (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = str(value)[:_PARAM_CHARS]
    return out


def experiment_of(client: Any, name: str) -> str:
    """The id of experiment ``name``, created when it does not exist yet."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else client.create_experiment(name)


def open_parent_run(cfg: Config, name: str, kind: str) -> str:
    """A new MLflow run for a comparison or a study, to hold its runs as nested runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment_id = experiment_of(client, cfg.train.experiment)
    run = client.create_run(experiment_id, run_name=name, tags={"tunesmith.study": kind})
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """End MLflow run ``run_id`` (a parent run once its runs are done)."""
    from mlflow.tracking import MlflowClient

    MlflowClient().set_terminated(run_id, status=status)


class MLflowSink:
    """Logs each metrics record to one MLflow run; ``run_id`` continues an earlier one.

    Args:
        cfg: The run's config (params, tags, experiment).
        run_dir: The run folder (run name, artifacts).
        run_id: The run to continue (``--resume``): what it already holds at a
            step is not logged again.
    """

    def __init__(self, cfg: Config, run_dir: Path, run_id: str | None = None) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        self.run_dir = Path(run_dir)
        self.log_best = cfg.train.log_best_checkpoint
        self.done: dict[str, int] = {}
        if run_id is not None:
            self.run_id = run_id
            self.done = self._logged_steps()
            self.client.update_run(run_id, status="RUNNING")
            return
        experiment_id = experiment_of(self.client, cfg.train.experiment)
        tags = {
            "tunesmith.task": cfg.task.type,
            "tunesmith.method": cfg.method.name,
            "tunesmith.model": cfg.model.name_or_path,
        }
        if cfg.train.tracker_parent:  # a run of a comparison or a study
            tags["mlflow.parentRunId"] = cfg.train.tracker_parent
        run = self.client.create_run(experiment_id, run_name=self.run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in flat_params(cfg.model_dump(mode="json")).items()]
        for start in range(0, len(params), _PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[start : start + _PARAMS_PER_CALL])
        self.client.log_batch(self.run_id, tags=[RunTag("tunesmith.run_dir", str(run_dir))])

    def _logged_steps(self) -> dict[str, int]:
        """The last step of every metric the run holds (a resumed run redoes later steps)."""
        run = self.client.get_run(self.run_id)
        return {
            key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
            for key in run.data.metrics
        }

    def __call__(self, record: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        split = str(record.get("split", "train"))
        step = int(record.get("step", 0))
        stamp = int(float(record.get("time", time.time())) * 1000)
        metrics = []
        for key, value in record.items():
            if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            name = metric_name(split, key)
            if step > self.done.get(name, -1):
                metrics.append(Metric(name, float(value), stamp, step))
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str = "FINISHED") -> None:
        """Upload the run folder's records (and ``best/`` if asked) and end the run."""
        if status == "FINISHED":
            for name in _ARTIFACTS:
                if (self.run_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(self.run_dir / name))
            if self.log_best and (self.run_dir / "best").is_dir():
                self.client.log_artifacts(self.run_id, str(self.run_dir / "best"), "best")
        self.client.set_terminated(self.run_id, status=status)
