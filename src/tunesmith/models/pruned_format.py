"""Saving and loading structurally pruned models (fewer heads or FFN neurons per layer).

A pruned model no longer matches its ``config.json``: BERT's config has one
head count and one FFN width for all layers. So the folder records which
original heads and neurons each layer kept, and loading rebuilds the full
architecture from the config, slices each layer to the recorded units and
loads the weights with strict checking — a file that does not fit is refused,
never half-loaded.

Format (no pickle anywhere; a safetensors file plus JSON)::

    config.json          the transformers config of the unpruned architecture
    pruned.safetensors   the pruned model's tensors under their usual names
    pruning.json         {"format": "tunesmith-pruned", "version": 1,
                          "architecture": "BertForSequenceClassification",
                          "kept": {"heads": [[0, 2, 3], ...], "neurons": [[...], ...]}}

The weights file is deliberately not called ``model.safetensors``: a tool that
loads the folder as a plain transformers model (or ``model.name_or_path`` of a
new run, which tolerates mismatched head shapes) would otherwise re-initialise
the pruned layers at random without failing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tunesmith.errors import ModelError
from tunesmith.models.folder_format import (
    build_from_config,
    load_strict,
    read_versioned,
    save_with_manifest,
)
from tunesmith.models.prune_structured import KINDS, Kept, apply_kept

FORMAT = "tunesmith-pruned"
VERSION = 1
WEIGHTS = "pruned.safetensors"
SPEC = "pruning.json"


def save_pruned(model: nn.Module, folder: str | Path, kept: Kept) -> Path:
    """Write ``config.json``, ``pruned.safetensors`` and ``pruning.json`` into ``folder``."""
    spec = {
        "format": FORMAT,
        "version": VERSION,
        "kept": {kind: kept[kind] for kind in KINDS},
    }
    return save_with_manifest(model, Path(folder), weights=WEIGHTS, manifest=SPEC, spec=spec)


def is_pruned(folder: str | Path) -> bool:
    """Whether ``folder`` holds a model saved by ``save_pruned``."""
    return (Path(folder) / SPEC).is_file()


def load_pruned(folder: str | Path, model_class: Any, *, trust_remote_code: bool = False) -> Any:
    """The structurally pruned model saved in ``folder``, in eval mode.

    Args:
        folder: A folder written by ``save_pruned``.
        model_class: An ``AutoModelFor*`` or model class to build from ``config.json``.
        trust_remote_code: Allow the config's own model code (only for folders you trust).

    Raises:
        ModelError: ``pruning.json`` is missing, of another format, or does not fit
            the architecture, or the tensors do not fit the sliced model.
    """
    from transformers import AutoConfig

    folder = Path(folder)
    spec = read_spec(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = build_from_config(model_class, config, trust_remote_code)
    try:
        apply_kept(model, spec["kept"])
    except ValueError as err:
        raise ModelError(f"{folder / SPEC}: does not fit the architecture ({err})") from None
    return load_strict(model, folder / WEIGHTS, what="pruned model")


def read_spec(folder: Path) -> dict[str, Any]:
    """``pruning.json`` of ``folder``, checked for a format this version reads.

    Raises:
        ModelError: Missing, unreadable, another format or version, no ``kept`` section.
    """
    path = folder / SPEC
    spec = read_versioned(
        path, FORMAT, VERSION, what="pruning manifest", redo="prune the model again"
    )
    if not isinstance(spec.get("kept"), dict):
        raise ModelError(f"{path}: no 'kept' section listing the heads and neurons of each layer")
    return spec
