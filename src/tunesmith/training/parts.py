"""What a ``Trainer`` is built from, grouped by role instead of twenty arguments.

Three collaborators besides the config, task, model and accelerator:

* ``LoopData``: what is trained and evaluated on, in which order;
* ``Optimization``: the optimizer and what clipping, monitoring and the LR
  schedule need to know about the trained parameters;
* ``LoopCallbacks``: where the loop reports (metrics, best weights, progress)
  and who may act on it (hooks, the checkpointer, the interrupt flag).

Each is a plain dataclass, so a call site names what it passes and a new
option lands in the group it belongs to, not at the end of a long signature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.data.batching import Collator, FeatureDataset
from tunesmith.training.interrupt import GracefulInterrupt
from tunesmith.training.monitor import MetricsLog
from tunesmith.training.resume import Checkpointer


@dataclass
class LoopData:
    """The training and validation features and how they are batched.

    Attributes:
        train_set: Training features.
        val_set: Validation features (may be empty: no evaluation).
        collator: Pads batches.
        labels: Label vocabulary for metrics.
        sampler: The training order (None: ``task.train_sampler``); replay
            passes one that mixes reference examples in.
    """

    train_set: FeatureDataset
    val_set: FeatureDataset
    collator: Collator
    labels: list[str]
    sampler: Any | None = None


@dataclass
class Optimization:
    """The optimizer and what the update needs to know about the trained parameters.

    Attributes:
        optimizer: Built from the method's parameter groups.
        grad_groups: Parameters by layer group, for per-group gradient norms,
            per-group clipping and naming the group that went non-finite.
        lr_factor: Extra per-step LR factor per method group (see ``build_scheduler``).
        cacheable: Whether the method allows caching the frozen blocks' output
            (``train.feature_cache``; also never with hooks, which may unfreeze).
    """

    optimizer: torch.optim.Optimizer
    grad_groups: dict[str, list[torch.nn.Parameter]] | None = None
    lr_factor: Callable[[str], Callable[[int], float] | None] | None = None
    cacheable: bool = True


@dataclass
class LoopCallbacks:
    """Where the loop reports, and the objects that act at its events.

    Attributes:
        metrics_log: Where metric records go.
        on_best: Called with the (unwrapped) model and metrics at each new best.
        checkpointer: Writes resumable checkpoints (None: never).
        interrupt: Set by SIGINT/SIGTERM; the loop then checkpoints and stops.
        hooks: Objects with ``on_train_start(trainer)`` and/or
            ``on_step_start(trainer, step)`` (e.g. progressive unfreezing);
            ``on_train_start`` runs while the Trainer is built, before the schedule.
        progress: Show a progress bar.
    """

    metrics_log: MetricsLog
    on_best: Callable[[torch.nn.Module, dict[str, Any]], None] | None = None
    checkpointer: Checkpointer | None = None
    interrupt: GracefulInterrupt | None = None
    hooks: Sequence[Any] = ()
    progress: bool = True
