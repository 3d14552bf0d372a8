"""Full fine-tuning: every parameter trains at the configured learning rate."""

from __future__ import annotations

from torch import nn

from tunesmith.methods.base import Method, register_method


@register_method
class FullFineTuning(Method):
    """Train everything; the baseline every other method is compared with."""

    name = "full"

    def apply(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
