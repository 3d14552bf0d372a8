"""``tunesmith tune``: a budgeted Optuna study over the config's ``search`` section.

Trials run one after another in this process, each a normal training run
(``api.train``) of ``Config.load(file, overrides + sampled values)``:

- the trial's objective is its best validation value of ``eval.metric``
  (never the test split: a tuning trial does not evaluate it);
- every validation evaluation is reported to Optuna through a metrics sink,
  and the pruner (median or successive halving) may stop the trial there;
- a sampled config that does not validate, a combination the model refuses
  (a ``TunesmithError``) and a diverged run are *pruned* with the reason kept
  in the trial's ``error`` attribute; any other exception is a bug and stops
  the study; Ctrl-C stops it after the current step (the trial is marked
  failed and does not count);
- the study lives in a database (SQLite by default), so running the same
  command again continues it: ``--trials`` is the total of finished (complete
  or pruned) trials, several processes can share one study, and a trial of a
  killed process is failed by Optuna's heartbeat after a grace period;
- a trial keeps ``metrics.jsonl``, ``summary.json`` and ``config.yaml`` only
  (with ``--keep-best`` also the best trial's ``best/`` checkpoint).
"""

from __future__ import annotations

import gc
import logging
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tunesmith.config.root import Config
from tunesmith.config.tune import TuneConfig
from tunesmith.errors import ConfigError, TrainingInterrupted, TunesmithError
from tunesmith.runs.train import train
from tunesmith.studies.tune.space import as_overrides, suggest
from tunesmith.training.trackers import end_parent_run, parent_run

log = logging.getLogger(__name__)

#: What a trial folder keeps.
KEPT_FILES = ("metrics.jsonl", "summary.json", "config.yaml", "splits.json", "parameters.json")


def tune_folder(cfg: Config) -> Path:
    """Where a study's database, trials and results go: ``<train.output_dir>-tune``."""
    return Path(cfg.train.output_dir + "-tune")


def storage_url(cfg: Config, folder: Path) -> str:
    """``tune.storage`` as an SQLAlchemy URL (a plain path is an SQLite file)."""
    given = cfg.tune.storage
    if given is None:
        return f"sqlite:///{(folder / 'study.db').resolve()}"
    return given if "://" in given else f"sqlite:///{Path(given).resolve()}"


def make_pruner(settings: TuneConfig) -> Any:
    """The Optuna pruner ``tune.pruner`` names."""
    import optuna

    # Reports are numbered from 1; Optuna may prune at step >= n_warmup_steps, so the
    # first evaluation open to pruning is warmup_evals + 1.
    first = settings.warmup_evals + 1
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=settings.startup_trials, n_warmup_steps=first
        )
    if settings.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=2)
    return optuna.pruners.NopPruner()


class PruningSink:
    """Reports each validation value to the trial; raises ``TrialPruned`` when told to stop.

    The report's step is the evaluation's number (1, 2, ...), not the optimizer
    step, so trials with different batch sizes are compared at the same point.
    """

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.evaluations = 0

    def __call__(self, record: dict[str, Any]) -> None:
        import optuna

        if record.get("split") != "validation" or record.get(self.metric) is None:
            return
        self.evaluations += 1
        value = float(record[self.metric])
        self.trial.report(value, self.evaluations)
        if self.trial.should_prune():
            raise optuna.TrialPruned(
                f"pruned after evaluation {self.evaluations} ({self.metric} {value:.4f})"
            )


class Objective:
    """One trial: sample, validate, train, report; returns the best validation value."""

    def __init__(
        self,
        config: Path,
        overrides: Sequence[str],
        folder: Path,
        *,
        keep_best: bool,
        on_event: Callable[[str], None],
        verbose: bool = False,
    ) -> None:
        self.verbose = verbose
        self.config = config
        self.overrides = list(overrides)
        self.folder = folder
        self.keep_best = keep_best
        self.on_event = on_event
        self.base = Config.load(config, overrides)

    def __call__(self, trial: Any) -> float:
        import optuna

        values = suggest(trial, self.base.search)
        run_dir = self.folder / "trials" / f"trial-{trial.number:04d}"
        changes = [
            *as_overrides(values),
            f"train.output_dir={run_dir}",
            "train.overwrite=true",
            "train.save_minutes=null",
            "train.save_steps=null",
        ]
        shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
        self.on_event(f"trial {trial.number}: {shown}")
        began = time.perf_counter()
        try:
            cfg = Config.load(self.config, [*self.overrides, *changes])
        except ConfigError as err:
            return self._prune(trial, f"invalid config: {err}", began)
        sink = PruningSink(trial, cfg.eval.metric)
        try:
            result = _train(cfg, sink, verbose=self.verbose)
        except optuna.TrialPruned as pruned:
            self._finish(trial, run_dir, began, sink.evaluations, keep=False)
            self.on_event(f"trial {trial.number}: {pruned} ({trial.user_attrs['seconds']:.0f} s)")
            raise
        except TrainingInterrupted:
            raise
        except TunesmithError as err:  # a combination this model or data refuses, divergence
            self._finish(trial, run_dir, began, sink.evaluations, keep=False)
            return self._prune(trial, f"{type(err).__name__}: {err}", None)
        value = result.loop.best_metric
        if value is None:
            raise ConfigError("tune: the trials have no validation split to score them on")
        keep = self.keep_best and _is_best(trial, float(value))
        self._finish(trial, run_dir, began, sink.evaluations, keep=keep)
        seconds = trial.user_attrs["seconds"]
        self.on_event(
            f"trial {trial.number}: {cfg.eval.metric} {float(value):.4f} ({seconds:.0f} s)"
        )
        return float(value)

    def _prune(self, trial: Any, reason: str, began: float | None) -> float:
        import optuna

        trial.set_user_attr("error", reason)
        if began is not None:
            trial.set_user_attr("seconds", round(time.perf_counter() - began, 2))
        self.on_event(f"trial {trial.number}: pruned, {reason}")
        raise optuna.TrialPruned(reason)

    def _finish(self, trial: Any, run_dir: Path, began: float, evals: int, *, keep: bool) -> None:
        trial.set_user_attr("seconds", round(time.perf_counter() - began, 2))
        trial.set_user_attr("evaluations", evals)
        trial.set_user_attr("run_dir", str(run_dir))
        _shrink(run_dir, keep_best=keep)
        if keep:  # only one best/ is kept: the newest best trial's
            for other in (self.folder / "trials").glob("trial-*/best"):
                if other.parent != run_dir:
                    shutil.rmtree(other, ignore_errors=True)
        gc.collect()


def _train(cfg: Config, sink: PruningSink, *, verbose: bool) -> Any:
    """One trial's run; its per-run log lines (data, parameter table...) only when verbose."""

    logger = logging.getLogger("tunesmith")
    held = logger.level
    if not verbose:
        logger.setLevel(max(held, logging.WARNING))
    try:
        return train(cfg, progress=False, sinks=[sink], test=False)
    finally:
        logger.setLevel(held)


def _is_best(trial: Any, value: float) -> bool:
    import optuna

    done = [
        t.value
        for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    ]
    if not done:
        return True
    maximize = trial.study.direction == optuna.study.StudyDirection.MAXIMIZE
    return value > max(done) if maximize else value < min(done)


def _shrink(run_dir: Path, *, keep_best: bool) -> None:
    """Delete everything but the metrics files (and ``best/`` when asked)."""
    if not run_dir.is_dir():
        return
    for path in run_dir.iterdir():
        if path.name in KEPT_FILES or (keep_best and path.name == "best"):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def finished(study: Any) -> int:
    """Trials that count towards ``--trials``: complete or pruned."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def open_study(cfg: Config, folder: Path) -> Any:
    """Create the study, or load it to continue (same name and storage)."""
    import optuna

    folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # the heartbeat is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            storage_url(cfg, folder), heartbeat_interval=30, grace_period=120
        )
    direction = "maximize" if cfg.higher_is_better() else "minimize"
    study = optuna.create_study(
        study_name=cfg.tune.study_name,
        storage=storage,
        direction=direction,
        load_if_exists=True,
    )
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"tune: study '{cfg.tune.study_name}' in {storage_url(cfg, folder)} was made to "
            f"{study.direction.name.lower()}, this config's eval.metric wants {direction}; "
            "set tune.study_name to start another study"
        )
    recorded = study.user_attrs.get("metric")
    if recorded is not None and recorded != cfg.eval.metric:
        raise ConfigError(
            f"tune: study '{cfg.tune.study_name}' scores {recorded}, this config "
            f"{cfg.eval.metric}; set tune.study_name to start another study"
        )
    study.set_user_attr("metric", cfg.eval.metric)
    # Seeded by how far the study is, so that a continued study does not re-draw
    # the first run's start-up samples.
    already = len(study.trials)
    study.sampler = optuna.samplers.TPESampler(seed=cfg.train.seed + already, n_startup_trials=4)
    study.pruner = make_pruner(cfg.tune)
    return study


def run_study(
    config: str | Path,
    overrides: Sequence[str] = (),
    *,
    trials: int,
    timeout_minutes: float | None = None,
    keep_best: bool = False,
    verbose: bool = False,
    on_event: Callable[[str], None] = log.info,
) -> tuple[Any, Path]:
    """Run (or continue) the study until it has ``trials`` finished trials or time runs out.

    Returns:
        The Optuna study and the tuning folder.
    """
    import optuna

    config = Path(config)
    base = Config.load(config, overrides)
    if not base.search:
        raise ConfigError(
            f"{config}: no search section; add e.g. search: {{optim.lr: {{loguniform: "
            "[1.0e-5, 1.0e-3]}}}"
        )
    folder = tune_folder(base)
    study = open_study(base, folder)
    parent = parent_run(base, folder, "tune")  # the trials nest under it in MLflow
    nested = [f"train.tracker_parent={parent}"] if parent else []
    objective = Objective(
        config,
        [*overrides, *nested],
        folder,
        keep_best=keep_best,
        on_event=on_event,
        verbose=verbose,
    )
    done = finished(study)
    if done >= trials:
        on_event(f"the study already has {done} finished trials (--trials {trials})")
        return study, folder
    on_event(f"study '{base.tune.study_name}': {done} finished trials, running to {trials}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        _optimize(study, objective, trials, timeout_minutes)
    end_parent_run(parent)
    return study, folder


def _optimize(study: Any, objective: Objective, trials: int, timeout_minutes: float | None) -> None:
    """Trials until ``trials`` are finished (completed or pruned) or the time is up."""
    import optuna

    study.optimize(
        objective,
        timeout=timeout_minutes * 60 if timeout_minutes else None,
        callbacks=[
            optuna.study.MaxTrialsCallback(
                trials,
                states=(
                    optuna.trial.TrialState.COMPLETE,
                    optuna.trial.TrialState.PRUNED,
                ),
            )
        ],
        gc_after_trial=True,
    )
