"""Optimizer parameter groups and the learning-rate schedule.

Weight decay is not applied to biases and normalisation weights (every
parameter with fewer than two dimensions): decaying them only pulls shifts and
scales towards zero. Each method group is split in two optimizer groups that
share its LR multiplier, and each optimizer group keeps its name so the loop
can log ``lr/<group>``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from tunesmith.config.root import OptimConfig
from tunesmith.methods.base import ParamGroup

log = logging.getLogger(__name__)


def optimizer_groups(groups: Sequence[ParamGroup], cfg: OptimConfig) -> list[dict]:
    """torch optimizer groups: per method group, one with and one without decay."""
    out: list[dict] = []
    for group in groups:
        decay = [p for _, p in group.params if p.ndim >= 2]
        no_decay = [p for _, p in group.params if p.ndim < 2]
        lr = cfg.lr * group.lr_multiplier
        for suffix, params, wd in (("", decay, cfg.weight_decay), ("/no_decay", no_decay, 0.0)):
            if params:
                out.append(
                    {
                        "params": params,
                        "lr": lr,
                        "initial_lr": lr,
                        "weight_decay": wd,
                        "name": group.name + suffix,
                        "group": group.name,
                        "lr_multiplier": group.lr_multiplier,
                    }
                )
    return out


def build_optimizer(groups: Sequence[ParamGroup], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the method's groups; fused where the build supports it (much faster on CPU)."""
    param_groups = optimizer_groups(groups, cfg)
    if not param_groups:
        raise ValueError("no trainable parameters")
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    try:
        return torch.optim.AdamW(param_groups, fused=True, **kwargs)
    except (RuntimeError, TypeError) as err:
        log.debug("fused AdamW unavailable (%s); using foreach", err)
        return torch.optim.AdamW(param_groups, foreach=True, **kwargs)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Warmup length in optimizer steps: explicit steps, else a ratio of the run."""
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return math.ceil(cfg.warmup_ratio * total_steps)


def schedule_factor(step: int, *, total: int, warmup: int, kind: str) -> float:
    """LR multiplier at optimizer step ``step``: linear warmup, then the decay ``kind``.

    Step 0 is the first update. Warmup starts above zero (``(step+1)/warmup``)
    so the first update is not wasted; decay reaches zero after ``total``
    steps for ``cosine`` and ``linear``.
    """
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: OptimConfig,
    total: int,
    group_factor: Callable[[str], Callable[[int], float] | None] | None = None,
) -> LambdaLR:
    """The configured schedule as a LambdaLR, one lambda per optimizer group.

    Args:
        optimizer: Built by ``build_optimizer`` (groups carry their method ``group``).
        cfg: The optim section.
        total: Optimizer steps of the run.
        group_factor: Per method group, an extra factor of the step (progressive
            unfreezing holds a group at 0 until its turn), or None.
    """
    warm = warmup_steps(cfg, total)

    def make(extra: Callable[[int], float] | None) -> Callable[[int], float]:
        def factor(step: int) -> float:
            base = schedule_factor(step, total=total, warmup=warm, kind=cfg.scheduler)
            return base * extra(step) if extra is not None else base

        return factor

    lambdas = [
        make(group_factor(g.get("group", g["name"])) if group_factor else None)
        for g in optimizer.param_groups
    ]
    return LambdaLR(optimizer, lambdas)


def optimized_groups(
    optimizer: torch.optim.Optimizer, groups: dict[str, list[torch.nn.Parameter]] | None
) -> dict[str, list[torch.nn.Parameter]]:
    """The named layer groups cut down to what ``optimizer`` updates (gradient-norm logging).

    Groups without an optimized parameter are dropped; with no groups, one ``all``.
    """
    optimized = [p for g in optimizer.param_groups for p in g["params"]]
    ids = {id(p) for p in optimized}
    by_group = {name: [p for p in ps if id(p) in ids] for name, ps in (groups or {}).items()}
    return {k: v for k, v in by_group.items() if v} or {"all": optimized}
