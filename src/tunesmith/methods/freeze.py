"""Freezing: train the head plus what the config adds (top blocks, biases, norms, globs).

``train_layers: 2`` is the "retrain the last 2-3 layers" recipe; with nothing
else set only the head trains (a linear probe); ``train_biases`` alone is
BitFit; ``train_norms`` trains the normalisation layers.
"""

from __future__ import annotations

from torch import nn

from tunesmith.config.method_specs import FreezeSpec
from tunesmith.methods.base import register_method
from tunesmith.methods.selection import LayeredMethod
from tunesmith.models.layers import EMBEDDINGS, HEAD, LayerMap


@register_method
class Freeze(FreezeSpec, LayeredMethod):
    """Everything is frozen except the head and the configured additions."""

    def select(self, model: nn.Module, layers: LayerMap) -> set[str]:
        m = self.cfg.method
        groups = {HEAD, *layers.top_blocks(m.train_layers or 0)}
        if m.train_embeddings:
            groups.add(EMBEDDINGS)
        chosen = {n for n, g in layers.group_of.items() if g in groups}
        norm_params = _norm_parameter_names(model) if m.train_norms else set()
        for name, _ in model.named_parameters():
            if (m.train_biases and name.endswith("bias")) or name in norm_params:
                chosen.add(name)
        return chosen


def _norm_parameter_names(model: nn.Module) -> set[str]:
    """Parameters of normalisation modules (LayerNorm, RMSNorm, T5LayerNorm, ...)."""
    names = set()
    for path, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            names.update(
                f"{path}.{n}" if path else n for n, _ in module.named_parameters(recurse=False)
            )
    return names
