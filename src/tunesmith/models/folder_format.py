"""What the deployment folder formats share: a versioned JSON manifest and strict loading.

The int8 (``quantization.json``) and structurally pruned (``pruning.json``)
folders both hold the unchanged ``config.json``, a safetensors file under a
name transformers does not pick up, and a manifest saying how to rebuild the
modules before the tensors load. Reading the manifest and loading the tensors
are the same steps for both, with the same refusals: a folder of another
format or version, or tensors that do not fit, is refused, never half-loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from tunesmith.errors import ModelError


def read_versioned(path: Path, fmt: str, version: int, *, what: str, redo: str) -> dict[str, Any]:
    """The JSON manifest at ``path`` if it is ``fmt`` at ``version``.

    Args:
        what: What the manifest is, for messages (``quantization manifest``).
        redo: How to make a current one (``export the int8 model again``).

    Raises:
        ModelError: Missing, unreadable, not a mapping, another format or version.
    """
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot read the {what} ({err})") from None
    if not isinstance(spec, dict) or spec.get("format") != fmt:
        raise ModelError(f"{path}: not a {fmt} manifest")
    if spec.get("version") != version:
        raise ModelError(
            f"{path}: format version {spec.get('version')} (this tunesmith reads {version}); "
            f"upgrade tunesmith or {redo}"
        )
    return spec


def save_with_manifest(
    model: nn.Module, folder: Path, *, weights: str, manifest: str, spec: dict[str, Any]
) -> Path:
    """Write ``config.json``, the tensors as ``weights`` and ``spec`` as JSON ``manifest``.

    ``spec`` gets the model's class as ``architecture`` (what loading builds).
    """
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save_model(model, str(folder / weights), metadata={"format": str(spec["format"])})
    spec = {**spec, "architecture": type(model).__name__}
    (folder / manifest).write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
    return folder


def build_from_config(model_class: Any, config: Any, trust_remote_code: bool) -> nn.Module:
    """The architecture from its config, randomly initialised (the weights load later)."""
    if hasattr(model_class, "from_config"):  # AutoModelFor* classes
        return model_class.from_config(config, trust_remote_code=trust_remote_code)
    return model_class._from_config(config)


def load_strict(model: nn.Module, weights: Path, *, what: str) -> nn.Module:
    """Load ``weights`` into ``model``, every tensor present and fitting; ``model`` in eval mode.

    Args:
        what: The model, for messages (``int8 model``).

    Raises:
        ModelError: The file cannot be read, or its tensors and the model's differ.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (OSError, ValueError, SafetensorError, RuntimeError) as err:
        raise ModelError(f"{weights}: cannot load the {what} ({err})") from None
    if missing or unexpected:
        names = ", ".join(sorted([*missing, *unexpected])[:5])
        raise ModelError(
            f"{weights}: tensors do not fit the {what}'s architecture "
            f"({len(missing)} missing, {len(unexpected)} unexpected: {names})"
        )
    return model.eval()
