"""Full fine-tuning: every parameter trains (LR shaping and unfreezing still apply)."""

from __future__ import annotations

from torch import nn

from tunesmith.config.method_specs import FullSpec
from tunesmith.methods.base import register_method
from tunesmith.methods.selection import LayeredMethod
from tunesmith.models.layers import EMBEDDINGS, LayerMap


@register_method
class FullFineTuning(FullSpec, LayeredMethod):
    """Train everything; the baseline every other method is compared with."""

    def select(self, model: nn.Module, layers: LayerMap) -> set[str]:
        skip = EMBEDDINGS if self.cfg.method.freeze_embeddings else None
        return {n for n, _ in model.named_parameters() if layers.group_of[n] != skip}
