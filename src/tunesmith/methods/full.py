"""Full fine-tuning: every parameter trains (LR shaping and unfreezing still apply)."""

from __future__ import annotations

from torch import nn

from tunesmith.methods.base import register_method
from tunesmith.methods.layers import LayerMap
from tunesmith.methods.selection import LayeredMethod


@register_method
class FullFineTuning(LayeredMethod):
    """Train everything; the baseline every other method is compared with."""

    name = "full"

    def select(self, model: nn.Module, layers: LayerMap) -> set[str]:
        return {n for n, _ in model.named_parameters()}
