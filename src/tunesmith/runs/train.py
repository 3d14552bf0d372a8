"""The training recipe: a run assembled in three named phases, setup, fit and finish.

``setup`` checks the inputs and the run folder, reads the data, builds the
task, the method and the model and writes what a run records before it
trains; ``fit`` runs the loop (resuming where asked) and saves ``final/``;
``finish`` frees the trained model, evaluates the test split on the chosen
checkpoint and writes the summary. ``train`` is the three in order and is
what ``tunesmith.api.train`` and ``tunesmith train`` call.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith._version import __version__
from tunesmith.config.root import Config
from tunesmith.core import paths
from tunesmith.data.batching import Collator, FeatureDataset
from tunesmith.data.profile import data_profile
from tunesmith.errors import ConfigError, TrainingInterrupted
from tunesmith.methods.base import METHODS, Method
from tunesmith.methods.param_table import format_parameter_table, parameter_table
from tunesmith.models.folders import read_manifest, save_model_folder
from tunesmith.models.loading import (
    base_signature,
    check_model_source,
    quiet_transformers,
)
from tunesmith.runs.extras import RunExtras, build_extras
from tunesmith.runs.parts import build_run_parts
from tunesmith.runs.predict import evaluate
from tunesmith.runs.rewards import rl_rewards
from tunesmith.tasks.base import DataSplits, Task, get_task
from tunesmith.training.deepspeed_cpu import whole_model_loading
from tunesmith.training.interrupt import GracefulInterrupt
from tunesmith.training.loop import LoopResult, Trainer
from tunesmith.training.monitor import MetricsLog
from tunesmith.training.parts import LoopCallbacks, LoopData
from tunesmith.training.precision import new_accelerator, resolve_precision
from tunesmith.training.resume import (
    Checkpointer,
    check_disk_space,
    check_resumable,
    data_fingerprint,
    estimate_checkpoint_mb,
    read_state,
    resolve_checkpoint,
    run_dir_of,
)
from tunesmith.training.scaleout import scale_out
from tunesmith.training.trackers import check_packages as check_tracker_packages
from tunesmith.training.trackers import start_trackers

log = logging.getLogger(__name__)

#: Files whose presence marks a folder as a tunesmith run (safe to replace on overwrite).
RUN_MARKERS = ("config.yaml", "metrics.jsonl")


@dataclass
class TrainResult:
    """Where a run's outputs are and what it measured."""

    output_dir: Path
    best_dir: Path | None
    final_dir: Path
    validation_metrics: dict[str, Any] = field(default_factory=dict)
    test_metrics: dict[str, Any] = field(default_factory=dict)
    loop: LoopResult = field(default_factory=LoopResult)
    parameters: list[dict[str, Any]] = field(default_factory=list)
    #: Reference metric before/after and retention (``forgetting`` section; {}: none).
    forgetting: dict[str, Any] = field(default_factory=dict)


def train(
    cfg: Config,
    *,
    progress: bool = True,
    resume: str | Path | None = None,
    force: bool = False,
    sinks: Sequence[Callable[[dict[str, Any]], None]] = (),
    test: bool = True,
) -> TrainResult:
    """Fine-tune ``cfg.model`` on ``cfg.data`` as configured; returns the result.

    Writes ``config.yaml``, ``splits.json``, ``metrics.jsonl``, ``best/``,
    ``final/`` and resumable ``checkpoints/`` under ``cfg.train.output_dir``.

    Args:
        cfg: The run's config.
        progress: Show progress bars.
        resume: ``latest``, a run folder or a checkpoint folder: continue that run
            so that the final weights equal those of an uninterrupted run.
        force: Resume even though the config or data changed (results differ).
        sinks: Also receive every metrics record as it is written (``tunesmith tune``
            reports validation metrics to its pruner through one; may raise to stop).
        test: Evaluate the test split at the end (a tuning trial must not look at it).

    Raises:
        TrainingInterrupted: SIGINT/SIGTERM; a resumable checkpoint was written.
    """

    quiet_transformers()
    run = setup(cfg, resume=resume, force=force, sinks=sinks)
    try:
        loop = fit(run, progress=progress)
        return finish(run, loop, test=test)
    except TrainingInterrupted:
        run.metrics_log.close("KILLED")  # trackers: a resumable run, not a failed one
        raise
    except BaseException:
        run.metrics_log.close("FAILED")
        raise


@dataclass
class Run:
    """What ``setup`` assembled for ``fit`` and ``finish``.

    ``model`` is set to None once training is over: the test evaluation reloads
    the chosen checkpoint, and must not sit on top of the trained model.
    """

    cfg: Config
    task: Task
    accelerator: Any
    out: Path
    checkpoint: Path | None
    splits: DataSplits
    tokenizer: Any
    method: Method
    model: torch.nn.Module | None
    train_set: FeatureDataset
    val_set: FeatureDataset
    test_set: FeatureDataset
    collator: Collator
    extras: RunExtras
    manifest: dict[str, Any]
    table: list[dict[str, Any]]
    metrics_log: MetricsLog
    fingerprint: str


def setup(
    cfg: Config,
    *,
    resume: str | Path | None = None,
    force: bool = False,
    sinks: Sequence[Callable[[dict[str, Any]], None]] = (),
) -> Run:
    """Check the inputs, read the data, build task, method and model; prepare the run folder.

    A bad input fails here, before the folder of a previous run is replaced.
    """
    t = cfg.train
    check_tracker_packages(cfg)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    task = get_task(cfg)
    _check_metric(cfg, task)
    check_model_source(cfg.model.name_or_path, allow_unsafe_weights=cfg.model.allow_unsafe_weights)
    # A task whose batches leave parts of the model unused (multi-task heads) needs DDP
    # to look for unused parameters.
    accelerator = new_accelerator(
        resolve_precision(t.precision), find_unused_parameters=not task.mixed_batches
    )
    if task.online:
        if accelerator.num_processes > 1:
            raise ConfigError(
                f"task.type {task.name} runs in one process (its rollouts are not shared "
                "between processes yet); launch it without accelerate's processes"
            )
        task.rewards = rl_rewards(cfg.rl)
    checkpoint = resolve_checkpoint(resume, t.output_dir) if resume is not None else None
    if checkpoint is not None:
        out = run_dir_of(checkpoint)
        if out != Path(t.output_dir).resolve():
            log.info("resuming the run in %s (not train.output_dir %s)", out, t.output_dir)
    else:
        out = Path(t.output_dir)
        _check_output_dir(out, t.overwrite)
        _check_not_inside_inputs_or_runs(out, cfg)
        accelerator.wait_for_everyone()  # every process checked before the main one writes

    with whole_model_loading(accelerator):  # ZeRO-3 partitions at prepare, not at load
        parts = build_run_parts(cfg, task)
        extras = build_extras(cfg, task, parts, out, resuming=checkpoint is not None)
    splits, tokenizer, method, model = parts.splits, parts.tokenizer, parts.method, parts.model
    groups = method.param_groups(model)
    table = parameter_table(method.layer_groups(model), groups, cfg.optim.lr)
    del groups  # the Trainer builds its own
    log.info("trainable parameters:\n%s", format_parameter_table(table))

    # transformers does not save a padding side changed after loading: keep it ourselves.
    manifest = {**_manifest(cfg, splits.labels), "padding_side": tokenizer.padding_side}
    if task.class_weights is not None:
        manifest["class_weights"] = task.class_weights
    # What served inputs are compared with (drift, ``tunesmith serve``'s /metrics).
    manifest["data_profile"] = data_profile(parts.train_set.features, splits.labels)
    if checkpoint is None:  # only now, with data, tokenizer and model known to be good
        _prepare_output_dir(out, t.overwrite, accelerator.is_main_process)
        accelerator.wait_for_everyone()
    fingerprint = data_fingerprint(extras.train_set.features)
    if checkpoint is not None:
        check_resumable(checkpoint, cfg, fingerprint, force=force)
    # Sinks and trackers on the main process only, like metrics.jsonl.
    main = accelerator.is_main_process
    trackers = start_trackers(cfg, out, resuming=checkpoint is not None) if main else []
    sinks = [*sinks, *trackers] if main else []
    metrics_log = MetricsLog(out / "metrics.jsonl", enabled=main, sinks=sinks)
    if main:
        if checkpoint is not None:  # records written after the checkpoint are redone
            metrics_log.truncate_after(read_state(checkpoint)["step"])
        cfg.save(out / "config.yaml")
        extras.save(out)
        (out / "splits.json").write_text(json.dumps(splits.provenance) + "\n")
        (out / "parameters.json").write_text(json.dumps(table, indent=1) + "\n")
    return Run(
        cfg=cfg,
        task=task,
        accelerator=accelerator,
        out=out,
        checkpoint=checkpoint,
        splits=splits,
        tokenizer=tokenizer,
        method=method,
        model=model,
        train_set=extras.train_set,
        val_set=parts.val_set,
        test_set=parts.test_set,
        collator=parts.collator,
        extras=extras,
        manifest=manifest,
        table=table,
        metrics_log=metrics_log,
        fingerprint=fingerprint,
    )


def fit(run: Run, *, progress: bool = True) -> LoopResult:
    """Train (from the checkpoint when resuming), keep ``best/``, save ``final/``.

    Afterwards the trained model and the optimizer state are released.

    Raises:
        TrainingInterrupted: SIGINT/SIGTERM; a resumable checkpoint was written.
    """
    cfg, task, method, accelerator, out = run.cfg, run.task, run.method, run.accelerator, run.out
    t = cfg.train

    def save_best(unwrapped: torch.nn.Module, metrics: dict[str, Any]) -> None:
        weights = scale_out(accelerator).gathered_weights(unwrapped)  # every process takes part
        if accelerator.is_main_process:
            save_model_folder(
                out / "best",
                lambda folder: task.save_weights(method, unwrapped, folder, weights),
                run.tokenizer,
                {**run.manifest, "validation": metrics, "task_state": task.fitted_state()},
            )

    checkpointer = Checkpointer(
        out, t.save_steps, t.save_minutes, t.save_total_limit, fingerprint=run.fingerprint
    )
    # The untrained model, before the loop takes it (and before a resume restores weights).
    task.before_training(run.model, (run.train_set, run.val_set), t.effective_eval_batch_size)
    with GracefulInterrupt() as interrupt:
        trainer = Trainer.for_method(
            cfg,
            task,
            run.model,
            method,
            accelerator,
            LoopData(
                run.train_set,
                run.val_set,
                run.collator,
                run.splits.labels,
                sampler=run.extras.sampler,
            ),
            LoopCallbacks(
                run.metrics_log,
                on_best=save_best,
                checkpointer=checkpointer,
                interrupt=interrupt,
                progress=progress,
            ),
            objective=run.extras.objective,
        )
        if accelerator.is_main_process:  # room for a checkpoint, best/ and final/
            needed = 3 * estimate_checkpoint_mb(trainer.optimizer)
            check_disk_space(out, needed, "this run's outputs")
        if run.checkpoint is not None:
            trainer.resume_from(run.checkpoint)
        loop = trainer.run()
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(trainer.model)
    weights = scale_out(accelerator).gathered_weights(unwrapped)
    if accelerator.is_main_process:
        save_model_folder(
            out / "final",
            functools.partial(task.save_weights, method, unwrapped, weights=weights),
            run.tokenizer,
            {**run.manifest, "validation": loop.last_validation, "task_state": task.fitted_state()},
        )
    # The test evaluation reloads the chosen checkpoint: free the trained model and
    # the optimizer state first, so the reload reuses their memory instead of
    # raising the process's peak.
    del unwrapped, weights
    run.model = None
    trainer.release()
    accelerator.free_memory()
    gc.collect()
    return loop


def finish(run: Run, loop: LoopResult, *, test: bool = True) -> TrainResult:
    """Evaluate the chosen checkpoint on the test split, measure forgetting, write the summary."""
    accelerator, out, cfg = run.accelerator, run.out, run.cfg
    final_dir = out / "final"
    best_dir = out / "best" if (out / "best").is_dir() else None
    result = TrainResult(
        output_dir=out,
        best_dir=best_dir,
        final_dir=final_dir,
        validation_metrics=read_manifest(best_dir).get("validation", {}) if best_dir else {},
        loop=loop,
        parameters=run.table,
    )
    # The main process alone reloads the chosen folder: whole weights, even under ZeRO-3.
    with whole_model_loading(accelerator):
        if test and len(run.test_set) and accelerator.is_main_process:
            chosen = best_dir or final_dir
            result.test_metrics = evaluate(
                chosen,
                records=run.splits.test,
                trust_remote_code=cfg.model.trust_remote_code,
                allow_unsafe_weights=cfg.model.allow_unsafe_weights,
            )
            run.metrics_log.write(
                {
                    "step": loop.steps,
                    "epoch": round(loop.epochs, 4),
                    "split": "test",
                    "checkpoint": chosen.name,
                    **result.test_metrics,
                }
            )
        if accelerator.is_main_process:
            result.forgetting = run.extras.forgetting(
                best_dir or final_dir, cfg.forgetting.max_ppl_increase
            )
            if result.forgetting:
                run.metrics_log.write(
                    {"step": loop.steps, "epoch": round(loop.epochs, 4), "split": "reference"}
                    | {
                        f"forgetting/{k}": v
                        for k, v in result.forgetting.items()
                        if not isinstance(v, list)  # the probes' answers: summary.json
                    }
                )
            _write_summary(result)
    run.metrics_log.close()
    accelerator.end_training()
    return result


# -- helpers ----------------------------------------------------------------
def _write_summary(result: TrainResult) -> None:
    """``summary.json``: the run's headline numbers, for reports and method comparisons."""
    loop = result.loop
    chosen = result.best_dir or result.final_dir
    summary = {
        "steps": loop.steps,
        "epochs": round(loop.epochs, 4),
        "train_seconds": round(loop.train_seconds, 2),
        "seconds_per_epoch": round(loop.train_seconds / loop.epochs, 2) if loop.epochs else None,
        "real_tokens_per_s": round(loop.tokens_per_s, 1),
        "feature_cache_seconds": round(loop.cache_seconds, 2),
        "peak_rss_mb": loop.peak_rss_mb,
        "stopped_early": loop.stopped_early,
        "best_step": loop.best_step,
        "trainable_parameters": result.parameters[-1]["trainable"],
        "total_parameters": result.parameters[-1]["parameters"],
        "trainable_percent": round(result.parameters[-1]["percent"], 4),
        "checkpoint": str(chosen),
        "checkpoint_weights_mb": read_manifest(chosen).get("weights_mb"),
        "validation": result.validation_metrics,
        "test": result.test_metrics,
    }
    if result.forgetting:
        summary["forgetting"] = result.forgetting
    (result.output_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def _check_metric(cfg: Config, task: Task) -> None:
    allowed = ("loss", *task.metric_names)
    if cfg.eval.metric not in allowed:
        raise ConfigError(
            f"eval.metric: '{cfg.eval.metric}' is not reported by task {task.name} "
            f"(choose one of: {', '.join(allowed)})"
        )


def _check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, a run folder that may not be replaced.

    Raises:
        ConfigError: It holds a previous run and ``overwrite`` is off, or it
            holds files that are not a tunesmith run.
    """
    if out.exists() and any(out.iterdir()):
        is_run = any((out / m).exists() for m in RUN_MARKERS)
        if not overwrite:
            raise ConfigError(
                f"train.output_dir: {out} already exists and is not empty; choose another "
                "folder or set train.overwrite=true to replace the previous run"
            )
        if not is_run:
            raise ConfigError(
                f"train.output_dir: {out} holds files that are not a tunesmith run; "
                "refusing to delete them even with train.overwrite=true"
            )


def _check_not_inside_inputs_or_runs(out: Path, cfg: Config) -> None:
    """The run folder may not sit inside another run, nor hold the model or the data.

    ``..`` in a path cannot smuggle one run's outputs into another's folder,
    and ``train.overwrite`` can never delete the inputs of the run itself.

    Raises:
        ConfigError: Naming the folder it collides with.
    """
    target = out.resolve()
    for parent in target.parents:
        if any((parent / m).is_file() for m in RUN_MARKERS):
            raise ConfigError(
                f"train.output_dir: {out} lies inside the run folder {parent}; "
                "choose a folder outside other runs"
            )
    d = cfg.data
    inputs = {"model.name_or_path": cfg.model.name_or_path}
    inputs |= {f"data.{k}": getattr(d, k, None) for k in ("train", "validation", "test")}
    for name, sub in cfg.multitask.tasks.items():  # multi-task: each task's own files
        files = ("train", "validation", "test")
        inputs |= {f"multitask.tasks.{name}.data.{k}": getattr(sub.data, k) for k in files}
    for key, value in inputs.items():
        if value and paths.exists(Path(value)) and Path(value).resolve().is_relative_to(target):
            raise ConfigError(
                f"train.output_dir: {out} contains {key} ({value}); a run folder is replaced "
                "on overwrite, so keep models and data outside it"
            )


def _prepare_output_dir(out: Path, overwrite: bool, main: bool) -> Path:
    """Create the run folder, replacing a previous run only with ``overwrite``.

    Called after the data, tokenizer and model loaded, so a bad input never
    costs the previous run.
    """
    if not main:  # checked by every process earlier; only the main one writes
        return out
    _check_output_dir(out, overwrite)
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    return out


def _manifest(cfg: Config, labels: list[str]) -> dict[str, Any]:
    return {
        "tunesmith_version": __version__,
        "task": cfg.task.type,
        "method": cfg.method.name,
        "adapter": METHODS.get(cfg.method.name).saves_adapter,
        "base_model": cfg.model.name_or_path,
        # Adapter checkpoints are refused on a base of another architecture or size.
        "base_signature": base_signature(cfg.model.name_or_path),
        "labels": labels,
        "config": json.loads(json.dumps(cfg.model_dump(mode="json"))),
    }
