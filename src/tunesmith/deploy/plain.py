"""A checkpoint's model as one plain transformers model, adapters merged.

Why one place: every deployment path (int8, ONNX, pruning) needs a model
without peft wrappers or extra modules, and must refuse the same methods
(bottleneck adapters, prefix and prompt tuning) with the same reason.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tunesmith.errors import ConfigError
from tunesmith.methods.base import METHODS


def plain_model(method_name: str, model: nn.Module, command: str) -> nn.Module:
    """``model`` itself, or its adapters folded into the base weights.

    Args:
        method_name: The checkpoint's ``method.name``.
        model: The loaded checkpoint model.
        command: What asks, for the message (``export --quantize int8``).

    Raises:
        ConfigError: The method's adapters cannot be merged (naming why).
    """
    method = METHODS.get(method_name)
    if not method.saves_adapter:
        return model
    merged = method.merged(model)
    if merged is None:
        reason = method.merge_blocker or "its extra modules cannot be folded into base weights"
        raise ConfigError(
            f"{command}: method '{method_name}' cannot be merged into the base weights "
            f"({reason}); {command} needs one plain model"
        )
    return merged


def plain_checkpoint(
    method_name: str, model: nn.Module, manifest: dict[str, Any], command: str
) -> tuple[nn.Module, dict[str, Any]]:
    """``plain_model`` with the checkpoint's manifest rewritten to describe what it returns."""
    if not METHODS.get(method_name).saves_adapter:
        return model, manifest
    return plain_model(method_name, model, command), merged_manifest(manifest)


def merged_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest of an adapter checkpoint rewritten for its merged (plain, full) model."""
    return {
        **manifest,
        "config": {**manifest["config"], "method": {"name": "full"}},
        "method": "full",
        "adapter": False,
        "merged_from": manifest.get("method"),
    }
