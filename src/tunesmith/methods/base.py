"""The Method interface (how a model is adapted) and its registry.

A method decides which parameters train and at what relative learning rate.
It returns named parameter groups; ``optim.build_optimizer`` turns them into
optimizer groups (splitting off weight-decay-free parameters), so every method
gets the same optimizer, schedule and logging without its own loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tunesmith.config.specs import TASK_SPECS, MethodSpec
from tunesmith.core.registry import Registry

if TYPE_CHECKING:
    from tunesmith.config.root import Config


@dataclass
class ParamGroup:
    """Parameters that share a learning-rate multiplier.

    Attributes:
        name: Shown in the parameter table and as ``lr/<name>`` in metrics.
        params: ``(qualified name, parameter)`` pairs.
        lr_multiplier: Factor applied to ``optim.lr``.
    """

    name: str
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    lr_multiplier: float = 1.0


class Method(MethodSpec, ABC):
    """How a model is adapted: what trains, and in which groups.

    Its name, accepted keys and capability flags come from its spec
    (``config/method_specs.py``), which each method inherits first:
    ``class LoRA(LoRASpec, PeftMethod)``.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @abstractmethod
    def apply(self, model: nn.Module) -> nn.Module:
        """Prepare ``model`` (freeze, wrap, inject); may return a new module."""

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        """The trainable parameters, grouped; default: one group of all of them."""
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [ParamGroup("all", params)]

    def layer_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Parameters by layer group, for per-group gradient norms and reports."""
        return {"all": list(model.parameters())}

    def lr_factor(self, group: str) -> Callable[[int], float] | None:
        """An extra per-step LR factor for a parameter group (None: always 1)."""
        return None

    def hooks(self) -> list[Any]:
        """Training-loop hooks this method needs (``on_train_start``/``on_step_start``)."""
        return []

    def task_has_new_head(self) -> bool:
        """Whether the task adds a new head that adapter methods train and save.

        False for tasks whose head is the model's pretrained output layer
        (``TaskSpec.new_head``): adapters then leave it frozen like the rest of the base.
        """
        return TASK_SPECS.get(self.cfg.task.type).new_head

    # -- checkpoints --------------------------------------------------------------
    #: Padding side the method needs, or None for the tokenizer's own.
    padding_side: str | None = None

    def save_weights(
        self, model: nn.Module, folder: Path, weights: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Write the trained weights into ``folder`` (a plain transformers folder by default).

        ``weights``: the model's whole state when ``model`` itself holds only a
        shard of it (FSDP gathers it on the main process, which saves).
        """
        model.save_pretrained(folder, safe_serialization=True, state_dict=weights)

    @classmethod
    def load_saved(cls, base: nn.Module, folder: Path) -> nn.Module:
        """Rebuild the trained model from ``base`` plus what ``save_weights`` wrote.

        Only called for methods with ``saves_adapter``; others load as plain
        transformers folders.
        """
        raise NotImplementedError(f"method {cls.name} saves whole models")

    #: Why ``merged`` returns None for this method (shown by ``export --merge``).
    merge_blocker: str = ""

    @classmethod
    def merged(cls, model: nn.Module) -> nn.Module | None:
        """A plain transformers model with the adaptation folded in, or None if impossible."""
        return model


METHODS: Registry[type[Method]] = Registry(
    "method.name",
    [
        "tunesmith.methods.full",
        "tunesmith.methods.freeze",
        "tunesmith.methods.peft_methods",
        "tunesmith.methods.bottleneck",
    ],
)
#: Class decorator adding a method to the registry under ``cls.name``.
register_method = METHODS.register
#: Names of every registered method.
method_names = METHODS.names


def get_method(cfg: Config) -> Method:
    """Instantiate the method named by ``cfg.method.name``."""
    return METHODS.get(cfg.method.name)(cfg)
