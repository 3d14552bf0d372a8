"""The Method interface (how a model is adapted) and its registry.

A method decides which parameters train and at what relative learning rate.
It returns named parameter groups; ``optim.build_optimizer`` turns them into
optimizer groups (splitting off weight-decay-free parameters), so every method
gets the same optimizer, schedule and logging without its own loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from tunesmith.errors import ConfigError

if TYPE_CHECKING:
    from tunesmith.config import Config


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


class Method(ABC):
    """How a model is adapted: what trains, and in which groups."""

    name: str = ""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @abstractmethod
    def apply(self, model: nn.Module) -> nn.Module:
        """Prepare ``model`` (freeze, wrap, inject); may return a new module."""

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        """The trainable parameters, grouped; default: one group of all of them."""
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [ParamGroup("all", params)]


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no registry name")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Names of every registered method."""
    _load_builtin_methods()
    return sorted(_REGISTRY)


def get_method(cfg: Config) -> Method:
    """Instantiate the method named by ``cfg.method.name``."""
    _load_builtin_methods()
    try:
        cls = _REGISTRY[cfg.method.name]
    except KeyError:
        raise ConfigError(
            f"method.name: unknown method '{cfg.method.name}' "
            f"(available: {', '.join(sorted(_REGISTRY))})"
        ) from None
    return cls(cfg)


def _load_builtin_methods() -> None:
    from tunesmith.methods import full  # noqa: F401
