"""Layer-based methods: which parameters train, at which relative learning rate.

``full`` and ``freeze`` differ only in the parameters they select; both share
layer discovery, glob patterns, learning-rate shaping (pyramid multipliers,
layer-wise decay) and progressive unfreezing, implemented once here.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable

from torch import nn

from tunesmith.config.methods import MethodConfig
from tunesmith.errors import ConfigError
from tunesmith.methods.base import Method, ParamGroup
from tunesmith.methods.unfreeze import ProgressiveUnfreezing
from tunesmith.models.layers import EMBEDDINGS, HEAD, LayerMap, discover_layers

log = logging.getLogger(__name__)


class LayeredMethod(Method):
    """Base of methods that select parameters by layer; subclasses pick the set.

    The keys they read (``SHAPING_KEYS`` and their own) are in their specs.
    """

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.layers: LayerMap | None = None
        self.selected: set[str] = set()
        self.unfreezing: ProgressiveUnfreezing | None = None

    def select(self, model: nn.Module, layers: LayerMap) -> set[str]:
        """Names of the parameters this method trains (before globs)."""
        raise NotImplementedError

    def apply(self, model: nn.Module) -> nn.Module:
        m: MethodConfig = self.cfg.method
        self.layers = discover_layers(model, m.blocks)
        names = [n for n, _ in model.named_parameters()]
        selected = self.select(model, self.layers)
        selected |= set(match_globs(names, m.include, "method.include"))
        selected -= set(match_globs(names, m.exclude, "method.exclude"))
        if not selected:
            raise ConfigError("method: the selection leaves no parameter to train")
        self.selected = selected
        for name, p in model.named_parameters():
            p.requires_grad_(name in selected)
        if m.unfreeze is not None:
            self.unfreezing = ProgressiveUnfreezing(model, self.layers, selected, m.unfreeze)
        return model

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        """One group per layer group holding selected parameters, with its LR multiplier.

        Parameters that progressive unfreezing will release later are included
        from the start (they receive no gradient until then), so optimizer
        state and LR checks stay stable across the run.
        """
        assert self.layers is not None, "apply() first"
        multiplier = lr_multiplier_fn(self.cfg.method, self.layers)
        groups = []
        for group in self.layers.groups:
            params = [(n, p) for n, p in self.layers.params_of(model, group) if n in self.selected]
            if params:
                groups.append(ParamGroup(group, params, multiplier(group)))
        return groups

    def layer_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        assert self.layers is not None, "apply() first"
        return {g: [p for _, p in self.layers.params_of(model, g)] for g in self.layers.groups}

    def lr_factor(self, group: str) -> Callable[[int], float] | None:
        if self.unfreezing is None:
            return None
        return self.unfreezing.lr_factor(group)

    def hooks(self) -> list:
        return [self.unfreezing] if self.unfreezing is not None else []


def match_globs(names: Iterable[str], patterns: Iterable[str], key: str) -> list[str]:
    """Parameter names matching any pattern; a pattern matching nothing is an error."""
    names = list(names)
    matched: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            sample = ", ".join(names[:3])
            raise ConfigError(
                f"{key}: pattern '{pattern}' matches no parameter (names look like: {sample}, ...)"
            )
        log.info("%s '%s' matched %d parameters", key, pattern, len(hits))
        matched.extend(hits)
    return matched


def lr_multiplier_fn(m: MethodConfig, layers: LayerMap) -> Callable[[str], float]:
    """Multiplier of ``optim.lr`` per layer group: pyramid times layer-wise decay."""
    pyramid = m.lr_multipliers

    def multiplier(group: str) -> float:
        value = 1.0
        if pyramid is not None:
            if group == EMBEDDINGS:
                value = pyramid.embeddings
            elif group == HEAD:
                value = pyramid.head
            elif isinstance(pyramid.blocks, tuple):
                low, high = pyramid.blocks
                value = low + (high - low) * layers.position(group)
            else:
                value = pyramid.blocks
        if m.llrd is not None:
            value *= m.llrd ** layers.depth_from_top(group)
        return value

    return multiplier
