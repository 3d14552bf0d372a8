"""The training loop: one explicit loop, readable top to bottom.

It runs on ``accelerate.Accelerator`` so ``accelerate launch`` gives DDP/FSDP
without this file knowing. ``Trainer.run`` walks epochs and accumulation
windows of ``grad_accum`` micro-batches; ``Trainer.train_step`` is one
optimizer step, written as one block:

1. count the supervised targets of the *whole* window (all processes), so the
   summed loss of each micro-batch is divided by the same number: the
   gradient equals that of one big batch (transformers #24725 got this wrong);
2. forward/backward each micro-batch (gradient sync only on the last);
3. skip the step if the loss or gradient norm is not finite (stop after
   ``max_bad_steps`` in a row), else clip, step optimizer and schedule;
4. count it (time, the non-finite streak, the sums behind the next log line);
5. log.

Between steps ``run`` evaluates, keeps the best, stops early and writes
checkpoints. Everything the loop mutates is ``self.state`` (a ``TrainState``),
which is exactly what a checkpoint stores of it.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tunesmith.config.root import Config
from tunesmith.data.packing import real_tokens, training_loader
from tunesmith.errors import TrainingDiverged, TrainingInterrupted
from tunesmith.methods.base import Method
from tunesmith.models.loading import enable_gradient_checkpointing
from tunesmith.objectives.objective import Objective
from tunesmith.tasks.base import Batch, Task
from tunesmith.tasks.inference import evaluate_dataset
from tunesmith.training.allocator import release_after_steps
from tunesmith.training.early_stop import EarlyStopping
from tunesmith.training.feature_cache import plan_cache
from tunesmith.training.monitor import peak_rss_mb
from tunesmith.training.optim import build_optimizer, build_scheduler, optimized_groups
from tunesmith.training.parts import LoopCallbacks, LoopData, Optimization
from tunesmith.training.resume import ResumeParts, RngState, restore_rng, restore_training_state
from tunesmith.training.scaleout import scale_out
from tunesmith.training.state import LogWindow, LoopResult, TrainState
from tunesmith.training.step import (
    StepStats,
    accumulation_windows,
    clip_to,
    describe_non_finite,
    short_metrics,
    train_record,
)

log = logging.getLogger(__name__)

#: The run's folder of evaluation examples (``samples/step-N.jsonl``).
SAMPLES = "samples"

#: What callers import from here besides the Trainer (defined next door).
__all__ = ["LoopResult", "StepStats", "Trainer", "accumulation_windows"]


class Trainer:
    """Holds the pieces one run needs; ``run()`` is the loop, ``train_step()`` one step.

    Args:
        cfg: The resolved config.
        task: The task (loss, counting, metrics).
        model: The model, already adapted by the method.
        accelerator: The ``accelerate.Accelerator`` of this process.
        data: Training and validation features, collator, labels, order.
        optimization: The optimizer and the trained parameters' layer groups.
        callbacks: Metrics log, best-weights callback, hooks, checkpointer, interrupt.
        objective: Loss terms and regularisers added to the task loss (None: none).

    Hooks get the Trainer itself (``on_train_start(trainer)``,
    ``on_step_start(trainer, step)``) and read ``model``, ``optimizer``,
    ``steps_per_epoch``, ``metrics_log`` or ``state``.

    The loop's position (``epoch``, ``batches_in_epoch``), counters and
    early stopping are ``self.state``, a ``TrainState``: a checkpoint stores its
    ``state_dict()`` and ``resume_from`` puts a fresh Trainer exactly where an
    interrupted one was.
    """

    def __init__(
        self,
        cfg: Config,
        task: Task,
        model: torch.nn.Module,
        accelerator: Any,
        *,
        data: LoopData,
        optimization: Optimization,
        callbacks: LoopCallbacks,
        objective: Objective | None = None,
    ) -> None:
        self.cfg, self.task, self.labels = cfg, task, data.labels
        self.acc = accelerator
        self.collator, self.train_set, self.val_set = data.collator, data.train_set, data.val_set
        self.metrics_log, self.on_best = callbacks.metrics_log, callbacks.on_best
        self.checkpointer, self.interrupt = callbacks.checkpointer, callbacks.interrupt
        self.progress = callbacks.progress
        self.objective = objective or Objective()
        t = cfg.train
        self.sampler = data.sampler or task.train_sampler(
            self.train_set.features,
            t.batch_size,
            group_by_length=cfg.data.group_by_length,
            seed=t.seed,
        )
        loader = training_loader(
            self.train_set,
            t.batch_size,
            self.sampler,
            self.collator,
            cfg.data.packed_rows,
            accelerator,
        )
        if t.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if t.compile:
            model = torch.compile(model)
        # FSDP and DeepSpeed replace parameters: the groups are found again by name.
        names = {id(p): n for n, p in model.named_parameters()}
        self.scale = scale_out(accelerator)
        self.scale.before_prepare(cfg, task, callbacks.hooks, self.objective)
        self.model, self.optimizer, self.loader = accelerator.prepare(
            model, optimization.optimizer, loader
        )
        grad_groups = self.scale.after_prepare(self.model, names, optimization.grad_groups)
        if not self.scale.checkpoints:
            self.checkpointer = None
        # The plain module: the feature cache swaps its submodules during a step.
        self.plain_model = accelerator.unwrap_model(self.model, keep_torch_compile=False)
        self.steps_per_epoch = max(1, math.ceil(len(self.loader) / t.grad_accum))
        self.steps_per_epoch *= task.updates_per_window()
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.state = TrainState(
            EarlyStopping(cfg.higher_is_better(), patience=t.early_stopping_patience)
        )
        self.hooks = list(callbacks.hooks)
        # Hooks learn the run's length before the schedule computes its first LR.
        self._call_hooks("on_train_start")
        cache_started = time.perf_counter()
        self.feature_cache = plan_cache(
            t.feature_cache,
            self.plain_model,
            self.train_set,
            self.collator,
            cacheable=optimization.cacheable
            and self.scale.feature_cache
            and not cfg.data.packed_rows
            and not self.hooks
            and task.mixed_batches
            and task.feature_cacheable
            and getattr(self.train_set, "fixed_inputs", True),
            batch_size=t.effective_eval_batch_size,
            folder=Path(t.output_dir) / ".cache",
            device=accelerator.device,
            model_inputs=task.model_inputs,
            progress=self.progress and accelerator.is_main_process,
        )
        self.scheduler = build_scheduler(
            self.optimizer, cfg.optim, self.total_steps, optimization.lr_factor
        )
        self.grad_groups = optimized_groups(self.optimizer, grad_groups)
        if self.feature_cache is not None:  # part of training time: HF pays it every epoch
            self.state.cache_seconds = time.perf_counter() - cache_started
            self.state.train_seconds = self.state.cache_seconds
        # Not loop state: the progress bar (a real one only inside ``run``), when the
        # current window's batching began, and RNG states a resume sets at the right time.
        self._bar: Any = tqdm(disable=True)
        self._window_started = time.perf_counter()
        self._pending_rng: RngState | None = None
        self._pending_window: list[Batch] | None = None

    @classmethod
    def for_method(
        cls,
        cfg: Config,
        task: Task,
        model: torch.nn.Module,
        method: Method,
        accelerator: Any,
        data: LoopData,
        callbacks: LoopCallbacks,
        *,
        objective: Objective | None = None,
    ) -> Trainer:
        """A Trainer for ``model`` as adapted by ``method`` (already applied).

        The one place that wires a method into the loop: its parameter groups
        become the optimizer, its layer groups the gradient monitoring, its
        hooks (run before ``callbacks.hooks``) and LR factors the schedule.
        """
        optimizer = build_optimizer(method.param_groups(model), cfg.optim)
        if cfg.train.return_freed_memory:
            release_after_steps(optimizer)
        grad_groups = method.layer_groups(model)
        hooks = [*method.hooks(), *callbacks.hooks]
        optimization = Optimization(
            optimizer,
            grad_groups=grad_groups,
            lr_factor=method.lr_factor,
            cacheable=method.prefix_cacheable,
        )
        return cls(
            cfg,
            task,
            model,
            accelerator,
            data=data,
            optimization=optimization,
            callbacks=replace(callbacks, hooks=hooks),
            objective=objective,
        )

    def resume_from(self, checkpoint: Path) -> None:
        """Continue where the run that wrote ``checkpoint`` stopped (call before ``run``)."""
        self._pending_rng, window = restore_training_state(self._resume_parts(), checkpoint)
        if self.state.updates_done < self.task.updates_per_window():
            self._pending_window = window

    # -- the loop -----------------------------------------------------------
    def run(self) -> LoopResult:
        """Train until ``total_steps`` or early stopping; returns what happened."""
        t, state = self.cfg.train, self.state
        self.model.train()
        self._bar = tqdm(
            total=self.total_steps,
            initial=state.step,
            desc="train",
            unit="step",
            disable=not (self.progress and self.acc.is_main_process),
            dynamic_ncols=True,
            # Redrawing every step floods logs when stderr is not a terminal.
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
        )
        self._stop_if_interrupted()
        if t.eval_at_start and state.step == 0 and state.last_eval_step is None:
            self.evaluate()
        while state.step < self.total_steps and not state.stopped_early:
            if not self._run_epoch():
                break
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            if not t.eval_steps and not state.stopped_early:
                self.evaluate()
        if state.last_eval_step != state.step and not state.stopped_early:
            self.evaluate()  # the final weights are always a candidate for best/
        self._bar.close()
        if not self.weights_finite():
            raise TrainingDiverged(
                f"training diverged: weights are non-finite after step {state.step}; "
                "final/ was not written (lower optim.lr)"
            )
        return state.result(self.steps_per_epoch, round(peak_rss_mb(), 1))

    def _run_epoch(self) -> bool:
        """Train through the rest of the current epoch; False when the run ends inside it."""
        t, state = self.cfg.train, self.state
        for window in self._epoch_windows():
            for batches in self._updates(window):
                self.train_step(batches)
                if t.eval_steps and state.step % t.eval_steps == 0:
                    self.evaluate()
                if state.stopped_early or state.step >= self.total_steps:
                    return False
                if self.checkpointer is not None and self.checkpointer.due(state.step):
                    self.checkpointer.save(self._resume_parts())
                self._stop_if_interrupted()
        return True

    def _updates(self, window: list[Batch] | None) -> Iterator[list[Batch]]:
        """The batches of each optimizer step a window gives.

        One step on the window itself for most tasks; an online task (RL)
        first turns the window into rollouts (``Task.rollout``) and takes
        ``Task.updates_per_window`` steps on them. ``window`` None continues
        the rollouts a resumed checkpoint stored, after the updates it had done.
        """
        state = self.state
        if window is None:
            batches, self._pending_window = self._pending_window or [], None
        else:
            state.batches_in_epoch += len(window)
            state.updates_done = 0
            batches = self.task.rollout(self.model, window)
        while state.updates_done < self.task.updates_per_window():
            state.updates_done += 1
            yield batches
            self._window_started = time.perf_counter()  # the next update's time starts now

    def _epoch_windows(self) -> Iterator[list[Batch] | None]:
        """Accumulation windows of the current epoch, from the current position.

        A resumed run re-creates the epoch's iterator, skips the micro-batches
        already consumed and only then restores the RNG states, because
        creating a DataLoader iterator draws from the global generator. When
        the checkpoint was written between the updates of one window's
        rollouts, None comes first: continue those.
        """
        epoch = self.state.epoch
        if hasattr(self.loader, "set_epoch"):  # accelerate re-seeds the sampler with this
            self.loader.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        if hasattr(self.train_set, "set_epoch"):  # dynamic masking draws per epoch
            self.train_set.set_epoch(epoch)
        batches = iter(self.loader)
        for _ in range(self.state.batches_in_epoch):
            next(batches, None)
        if self._pending_rng is not None:
            restore_rng(*self._pending_rng)
            self._pending_rng = None
        if self._pending_window is not None:
            self._window_started = time.perf_counter()
            yield None
        mark = time.perf_counter()  # training time counts batching, not evaluation
        for window in accumulation_windows(batches, self.cfg.train.grad_accum):
            self._window_started = mark
            yield window
            mark = time.perf_counter()

    def train_step(self, window: list[Batch], *, account: bool = True) -> StepStats:
        """One optimizer step over the micro-batches of ``window``, top to bottom.

        Args:
            window: The step's micro-batches.
            account: Run the step's hooks and count and log it (False: only
                the update, for ``estimate``, which measures a step's cost).

        Raises:
            TrainingDiverged: ``max_bad_steps`` steps in a row were non-finite.
        """
        acc, task, state, t = self.acc, self.task, self.state, self.cfg.train
        if account:
            self._call_hooks("on_step_start", state.step)

        # 1. The normaliser: the window's targets over all processes. DDP averages
        #    gradients over processes; multiplying by their number turns that mean
        #    back into a sum, so every micro-batch is divided by the global count.
        local = sum(task.count_targets(b).to(acc.device) for b in window).float()
        total = acc.reduce(local.clone(), "sum") if acc.num_processes > 1 else local
        scale = acc.num_processes / total.clamp(min=1.0)

        # 2. Forward/backward each micro-batch; gradients sync on the last only.
        loss_sum = torch.zeros((), device=acc.device)
        tokens = 0
        for i, batch in enumerate(window):
            sync = i == len(window) - 1
            with (
                self._replaying(batch),
                nullcontext() if sync else acc.no_sync(self.model),
                acc.autocast(),
            ):
                outputs = task.forward(self.model, batch)
                part = task.loss_sum(outputs, batch)
                loss = self.objective.batch_loss(part, outputs, batch) * scale
                # Once per step, inside the step's gradient sync (see train/objective.py).
                penalty = self.objective.step_penalty(self.plain_model) if sync else None
                if penalty is not None:
                    loss = loss + penalty
            self.scale.backward(loss, sync)
            loss_sum += part.detach().float()
            tokens += real_tokens(batch)
        loss_value = float(loss_sum)

        # 3. Guard, clip, update: norms of true gradients (fp16: unscaled first),
        #    taken before clipping; a non-finite loss or norm skips the update.
        acc.unscale_gradients()
        norms = self.group_grad_norms()
        grad_norm = self.scale.step_norm(self.model, math.sqrt(sum(v * v for v in norms.values())))
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        bad_where = ""
        if finite:
            self._clip(norms, grad_norm)
            self.optimizer.step()
            self.scheduler.step()
        else:
            bad_where = describe_non_finite(loss_value, norms)
            log.warning("non-finite values at step %d (%s): step skipped", state.step, bad_where)
        self.optimizer.zero_grad(set_to_none=True)
        stats = StepStats(
            loss_value,
            float(local),
            tokens,
            grad_norm,
            not finite,
            norms,
            bad_where,
            {**self.objective.take_parts(), **task.take_parts()},
        )
        if not account:
            return stats

        # 4. Count: time (skipped steps included), the non-finite streak, the sums.
        seconds = time.perf_counter() - self._window_started
        state.train_seconds += seconds
        state.window.seconds += seconds
        if stats.skipped:
            state.bad_steps += 1
            if state.bad_steps >= t.max_bad_steps:
                raise TrainingDiverged(
                    f"training diverged: non-finite loss or gradients in {state.bad_steps} "
                    f"consecutive steps (last at step {state.step}, "
                    f"{stats.bad_where}); lower optim.lr or check the data" + self._last_good()
                )
            return stats
        state.bad_steps = 0
        state.step += 1
        state.real_tokens += tokens
        state.targets += stats.targets
        state.window.add_step(loss_value, stats.targets, tokens, stats.parts)

        # 5. Log: a train line every log_steps (and at the last step) with the
        #    window's means; per-group gradient norms every grad_norm_steps.
        epochs = state.step / self.steps_per_epoch
        group_norms = norms if state.step % self._grad_norm_every == 0 else {}
        if state.step % t.log_steps == 0 or state.step == self.total_steps:
            w = state.window
            tok_s = w.tokens / max(w.seconds, 1e-9)
            mean_loss = w.loss / max(w.targets, 1.0)
            groups = self.optimizer.param_groups
            record = train_record(
                state.step, epochs, mean_loss, groups, grad_norm, group_norms, tok_s
            )
            record.update(self.objective.log_fields(record["loss"], w.parts, w.targets, w.steps))
            record.update(self.task.log_fields(w.parts, w.targets))
            state.window = LogWindow()
            self.metrics_log.write(record)
            self._bar.set_postfix(
                refresh=False,
                loss=f"{record['loss']:.4f}",
                lr=f"{record[f'lr/{self._first_group()}']:.2e}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                **self.task.progress_fields(record),
            )
        elif group_norms:
            self.metrics_log.write(
                {"step": state.step, "epoch": round(epochs, 4), "split": "train"}
                | {f"grad_norm/{k}": v for k, v in group_norms.items()}
            )
        self._bar.update(1)
        return stats

    def _last_good(self) -> str:
        """Where the last good weights are, for a message that stops the run."""
        saved = self.checkpointer.last_saved if self.checkpointer is not None else None
        if saved is None:
            return " (no resumable checkpoint was written yet)"
        return f" (last resumable checkpoint: {saved}, steps before the problem)"

    def _stop_if_interrupted(self) -> None:
        """After SIGINT/SIGTERM: write a resumable checkpoint (if any step ran) and stop."""
        if self.interrupt is None or self.interrupt.requested is None:
            return
        name, steps = self.interrupt.signal_name, self.state.step
        if steps and self.checkpointer is not None:
            where = self.checkpointer.save(self._resume_parts())
            message = (
                f"training interrupted by {name} after step {steps}: resumable checkpoint "
                f"written to {where}; continue with --resume latest"
            )
        else:
            when = f"after step {steps} (this run writes no checkpoints)"
            when = when if steps else "before any step"
            message = f"training interrupted by {name} {when}; nothing to resume"
        raise TrainingInterrupted(message, self.interrupt.requested)

    def _resume_parts(self) -> ResumeParts:
        """The state and live objects a checkpoint is written from and restored into."""
        return ResumeParts(
            self.cfg, self.state, self.model, self.optimizer, self.scheduler, self.acc, self.task
        )

    def release(self) -> None:
        """Drop the model, optimizer state and data loader once training is over."""
        self.optimizer.state.clear()
        if self.feature_cache is not None:
            self.feature_cache.close()
            self.feature_cache = None
        self.model = self.optimizer = self.scheduler = self.loader = None  # type: ignore[assignment]
        self.plain_model = None  # type: ignore[assignment]
        self.grad_groups, self.hooks = {}, []

    # -- helpers of a step ----------------------------------------------------
    def _replaying(self, batch: Batch) -> Any:
        """Run only the blocks above the cached frozen prefix (when there is a cache)."""
        if self.feature_cache is None:
            return nullcontext()
        return self.feature_cache.replaying(self.plain_model, batch)

    def group_grad_norms(self) -> dict[str, float]:
        """L2 norm of the gradients of each layer group (groups without gradients omitted)."""
        grads = {
            name: [p.grad.detach() for p in params if p.grad is not None]
            for name, params in self.grad_groups.items()
        }
        return self.scale.group_norms(grads)

    def _clip(self, norms: dict[str, float], total: float) -> None:
        """Clip by the global norm, or each layer group by its own, with norms already known."""
        max_norm = self.cfg.optim.max_grad_norm
        if max_norm is None:
            return
        if self.cfg.optim.clip_mode == "per_group":
            for name, norm in norms.items():
                params = [p for p in self.grad_groups[name] if p.grad is not None]
                clip_to(params, max_norm, norm)
        else:
            params = [p for ps in self.grad_groups.values() for p in ps if p.grad is not None]
            clip_to(params, max_norm, total)

    def weights_finite(self) -> bool:
        """Whether every trained weight is finite (checked before anything is saved)."""
        return self.scale.all_finite(p for ps in self.grad_groups.values() for p in ps)

    def _call_hooks(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            method = getattr(hook, event, None)
            if method is not None:
                method(self, *args)

    @property
    def _grad_norm_every(self) -> int:
        return self.cfg.train.grad_norm_steps or self.cfg.train.log_steps

    def _first_group(self) -> str:
        group = self.optimizer.param_groups[-1]  # the head's, usually the largest LR
        return group.get("group", group["name"])

    # -- evaluation -----------------------------------------------------------
    def _write_samples(self, samples: list[dict[str, Any]]) -> None:
        """Write an evaluation's examples (RL: completions, rewards) to ``samples/step-N.jsonl``."""
        if not samples or not self.acc.is_main_process:
            return
        folder = Path(self.cfg.train.output_dir) / SAMPLES
        folder.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(s, ensure_ascii=False, default=str) + "\n" for s in samples)
        (folder / f"step-{self.state.step:07d}.jsonl").write_text(lines, encoding="utf-8")

    def evaluate(self) -> dict[str, Any] | None:
        """Evaluate on validation, log, track the best, decide early stopping."""
        if not len(self.val_set):
            return None
        state, stopper = self.state, self.state.stopper
        state.last_eval_step = state.step
        epochs = state.step / self.steps_per_epoch
        metrics, _ = evaluate_dataset(
            self.model,
            self.task,
            self.val_set,
            self.collator,
            self.labels,
            self.cfg.train.eval_batch_size or 2 * self.cfg.train.batch_size,
            accelerator=self.acc,
            generate=self.cfg.generate.in_eval,
            generate_limit=self.cfg.generate.eval_samples,
            calibrate=True,  # thresholds and the like are fitted on validation only
        )
        state.last_validation = metrics
        self._write_samples(self.task.evaluation_samples())
        self.metrics_log.write(
            {"step": state.step, "epoch": round(epochs, 4), "split": "validation", **metrics}
        )
        if not (math.isfinite(metrics.get("loss", 0.0)) and self.weights_finite()):
            raise TrainingDiverged(
                f"training diverged: weights or validation loss are non-finite at step "
                f"{state.step}; nothing was saved from this point (lower optim.lr)"
            )
        value = metrics[self.cfg.eval.metric]
        if stopper.update(value, state.step) and self.on_best is not None:
            self.on_best(self.acc.unwrap_model(self.model), metrics)
        if stopper.should_stop:
            state.stopped_early = True
            log.info(
                "early stopping at step %d: %s has not improved for %d evaluations (best %.4f "
                "at step %d)",
                state.step,
                self.cfg.eval.metric,
                stopper.bad_evals,
                stopper.best,
                stopper.best_step,
            )
        if self.acc.is_main_process:
            log.info(
                "step %d validation: %s", state.step, short_metrics(metrics, self.task.metric_names)
            )
        return metrics
