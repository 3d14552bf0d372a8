"""Progressive unfreezing (ULMFiT): the head first, then one more block at a time.

Stage 0 trains the head (and ``start_layers`` top blocks of every stack);
each interval releases the next block down, until ``max_layers`` blocks (or
every selected block, then the embeddings if selected) train. Selected groups
below ``max_layers`` never train. A block's
parameters are in the optimizer from the start but get no gradient before
their stage; their learning rate is held at zero until then and, with
``warmup_steps``, ramps up linearly afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from tunesmith.config.methods import UnfreezeConfig
from tunesmith.models.layers import EMBEDDINGS, HEAD, LayerMap

log = logging.getLogger(__name__)


class ProgressiveUnfreezing:
    """A training-loop hook releasing layer groups on a step schedule."""

    def __init__(
        self, model: nn.Module, layers: LayerMap, selected: set[str], cfg: UnfreezeConfig
    ) -> None:
        self.cfg = cfg
        self.params = {
            group: [p for n, p in layers.params_of(model, group) if n in selected]
            for group in layers.groups
        }
        self.stages = _stages(layers, self.params, cfg)
        self.interval = cfg.every_steps or 0  # set from every_epochs in on_train_start
        self.released: dict[str, int] = {}

    # -- schedule -------------------------------------------------------------
    def stage_at(self, step: int) -> int:
        """Index of the last stage released at optimizer step ``step``."""
        return min(len(self.stages) - 1, step // self.interval) if self.interval else 0

    def release_step(self, group: str) -> int | None:
        """The step at which ``group`` starts training (None: never)."""
        for index, stage in enumerate(self.stages):
            if group in stage:
                return index * self.interval
        return None

    def lr_factor(self, group: str) -> Callable[[int], float]:
        """LR factor of ``group`` at a step: 0 before release, then a linear warmup."""
        warm = self.cfg.warmup_steps

        def factor(step: int) -> float:
            start = self.release_step(group)
            if start is None or step < start:
                return 0.0
            return min(1.0, (step - start + 1) / warm) if warm else 1.0

        return factor

    # -- hook -----------------------------------------------------------------
    def on_train_start(self, trainer: Any) -> None:
        """Turn an epoch interval into steps, and freeze everything not yet released."""
        if self.cfg.every_epochs is not None:
            self.interval = self.cfg.every_epochs * trainer.steps_per_epoch
        for group, params in self.params.items():
            trainable = any(group in stage for stage in self.stages[:1])
            for p in params:
                p.requires_grad_(trainable)
        self.released = {g: 0 for g in self.stages[0]}

    def on_step_start(self, trainer: Any, step: int) -> None:
        """Release the groups whose stage starts at ``step``."""
        for stage in self.stages[: self.stage_at(step) + 1]:
            for group in stage:
                if group in self.released:
                    continue
                for p in self.params[group]:
                    p.requires_grad_(True)
                self.released[group] = step
                log.info("progressive unfreezing: %s trains from step %d", group, step)
                trainer.metrics_log.write({"step": step, "split": "train", "unfrozen": group})


def _stages(
    layers: LayerMap, params: dict[str, list[nn.Parameter]], cfg: UnfreezeConfig
) -> list[list[str]]:
    """Groups released at each stage: the head (+ start blocks), then one depth per stage."""
    has = {g for g, ps in params.items() if ps}
    depth = max(len(s) for s in layers.blocks)
    limit = min(depth, cfg.max_layers) if cfg.max_layers is not None else depth
    start = min(cfg.start_layers, limit)
    first = [g for g in (HEAD, *layers.top_blocks(start)) if g in has]
    stages = [first]
    for k in range(start + 1, limit + 1):
        new = [g for g in layers.top_blocks(k) if g in has and g not in layers.top_blocks(k - 1)]
        if new:
            stages.append(new)
    if cfg.max_layers is None and EMBEDDINGS in has:
        stages.append([EMBEDDINGS])
    return stages
