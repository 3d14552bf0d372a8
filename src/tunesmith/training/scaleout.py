"""How a run is split over processes: the one object the loop asks about it.

The launch config (``accelerate launch``, ``torchrun`` with accelerate's
environment) decides the layout; tunesmith follows it. Three layouts differ
in what each process holds, so the loop's own arithmetic (gradient norms,
the finiteness guard), its backward pass and the saved folders differ too:

* ``Replicated``: one process, or data parallel (DDP): whole tensors
  everywhere, accelerate averages the gradients.
* ``Sharded``: FSDP2; every parameter, gradient and moment is a ``DTensor``
  of which each process holds one shard (``tunesmith.training.sharding``).
* ``DeepSpeedZero``: ZeRO-2/3; the engine owns the gradients, clips them and
  steps inside ``backward`` (``tunesmith.training.deepspeed_cpu``).

The loop calls the same methods whichever layout runs, so it reads the same
for all three and neither DDP nor one process pays for the others.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from tunesmith.config.root import Config
from tunesmith.training import deepspeed_cpu, sharding

log = logging.getLogger(__name__)

#: A method's layer groups: group name -> its parameters (None: the method has none).
Groups = dict[str, list[torch.nn.Parameter]] | None


class Replicated:
    """One process or DDP: every process holds the whole model (the default)."""

    #: Whether the loop may swap the frozen prefix for cached features.
    feature_cache = True
    #: Whether resumable checkpoints can be written and restored.
    checkpoints = True

    def __init__(self, accelerator: Any) -> None:
        self.acc = accelerator

    def before_prepare(self, cfg: Config, task: Any, hooks: Sequence[Any], objective: Any) -> None:
        """Refuse what this layout cannot train; configure its engine (before ``prepare``)."""

    def after_prepare(
        self, model: torch.nn.Module, names: dict[int, str], groups: Groups
    ) -> Groups:
        """The method's layer groups as parameters of the prepared ``model``."""
        return groups

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        """Backward of one micro-batch; ``sync``: the window's last one."""
        self.acc.backward(loss)

    def group_norms(self, grads: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """L2 norm of each layer group's gradients (groups without any left out)."""
        return {name: float(torch.nn.utils.get_total_norm(g)) for name, g in grads.items() if g}

    def step_norm(self, model: Any, norm: float) -> float:
        """The step's global gradient norm, given the one of the loop's groups."""
        return norm

    def all_finite(self, tensors: Iterable[torch.Tensor]) -> bool:
        """Whether every tensor is finite (the same answer on every process)."""
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    def gathered_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole weights for ``best/`` and ``final/`` (None: save the model's own).

        Every process must call it: gathering is a collective.
        """
        return None


class Sharded(Replicated):
    """FSDP2: each process holds a shard of every parameter, gradient and moment."""

    feature_cache = False

    def before_prepare(self, cfg: Config, task: Any, hooks: Sequence[Any], objective: Any) -> None:
        sharding.check_shardable(cfg, task, hooks, objective, engine="FSDP (sharded training)")
        log.info("training through FSDP on %d processes", self.acc.num_processes)

    def after_prepare(
        self, model: torch.nn.Module, names: dict[int, str], groups: Groups
    ) -> Groups:
        sharding.fix_gradient_reduction(model, self.acc.num_processes)
        return sharding.regroup(groups, names, model)

    def group_norms(self, grads: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        return sharding.group_norms(grads, self.acc.device)

    def all_finite(self, tensors: Iterable[torch.Tensor]) -> bool:
        return sharding.all_finite(tensors, self.acc.device)

    def gathered_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        return sharding.full_state_dict(model)


class DeepSpeedZero(Replicated):
    """DeepSpeed ZeRO-2/3: the engine reduces, clips and steps inside ``backward``."""

    feature_cache = False
    checkpoints = False

    def before_prepare(self, cfg: Config, task: Any, hooks: Sequence[Any], objective: Any) -> None:
        problems = deepspeed_cpu.unsupported(self.acc, cfg)
        sharding.check_shardable(
            cfg, task, hooks, objective, engine="DeepSpeed ZeRO", problems=problems
        )
        deepspeed_cpu.configure(self.acc, cfg)

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        deepspeed_cpu.set_boundary(self.acc, sync)
        self.acc.backward(loss, **deepspeed_cpu.backward_kwargs(self.acc))

    def step_norm(self, model: Any, norm: float) -> float:
        # ZeRO keeps gradients in its own partitions (``p.grad`` is None): the
        # loop's groups see nothing, the engine knows the norm it clipped.
        return deepspeed_cpu.grad_norm(self.acc, model)

    def gathered_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        return deepspeed_cpu.gathered_weights(self.acc, model)


def scale_out(accelerator: Any) -> Replicated:
    """The layout of this run, from its accelerator (after the launch config took effect)."""
    if sharding.is_sharded(accelerator):
        return Sharded(accelerator)
    if deepspeed_cpu.is_deepspeed(accelerator):
        return DeepSpeedZero(accelerator)
    return Replicated(accelerator)
