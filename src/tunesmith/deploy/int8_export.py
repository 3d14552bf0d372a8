"""``export --quantize int8``: a checkpoint as a new int8 checkpoint folder.

The result is a tunesmith checkpoint like ``best/`` (tokenizer, ``tunesmith.json``
with ``"quantized": "int8"``) whose weights are in the format of
``deploy.quantize``, so ``eval``, ``eval --full`` and ``predict`` load it as they
load any checkpoint. Written next to ``best/`` inside the run folder,
``eval --split test`` finds the run's splits for it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.deploy.plain import plain_checkpoint
from tunesmith.errors import ConfigError
from tunesmith.models.folders import save_model_folder
from tunesmith.models.loading import checkpoint_manifest
from tunesmith.models.pruned_format import is_pruned
from tunesmith.models.quantize import quantize_int8, save_quantized
from tunesmith.runs.load import load_checkpoint


def export_int8(checkpoint: str | Path, output: str | Path) -> Path:
    """Write the int8 version of ``checkpoint`` to the new folder ``output``; returns it.

    Adapter checkpoints whose method can merge (LoRA, DoRA, IA3) are merged into
    their base first, as ``export --merge`` does, and the merged model is quantized.

    Raises:
        ConfigError: ``output`` exists, or the checkpoint cannot be quantized
            (an adapter that cannot be merged, a multi-task model, already int8).
        ModelError: ``checkpoint`` is not a checkpoint folder.
    """

    output = Path(output)
    if output.exists():
        raise ConfigError(f"export: {output} already exists; choose a new folder")
    manifest = checkpoint_manifest(checkpoint)
    check_quantizable(checkpoint, manifest)
    cfg, _task, model, tokenizer, _labels = load_checkpoint(checkpoint)
    model, manifest = plain_checkpoint(cfg.method.name, model, manifest, "export --quantize int8")
    quantize_int8(model)
    # The fp32 model's validation metrics do not describe this one: the comparison does.
    meta = {k: v for k, v in manifest.items() if k != "validation"}
    meta |= {"quantized": "int8", "quantized_from": str(checkpoint)}
    return save_model_folder(output, lambda folder: save_quantized(model, folder), tokenizer, meta)


def check_quantizable(checkpoint: str | Path, manifest: dict[str, Any]) -> None:
    """Refuse, before loading, checkpoints that int8 export cannot take.

    Raises:
        ConfigError: Already int8, structurally pruned, or a multi-task model.
    """

    if manifest.get("quantized"):
        raise ConfigError(f"export --quantize: {checkpoint} is already {manifest['quantized']}")
    if is_pruned(checkpoint):  # the int8 format rebuilds the unpruned shapes from config.json
        raise ConfigError(
            f"export --quantize: {checkpoint} had heads or neurons removed (tunesmith prune); "
            "int8 export takes unpruned or magnitude-pruned checkpoints"
        )
    if manifest.get("task") == "multitask":
        raise ConfigError(
            f"export --quantize: {checkpoint} is a multi-task model; int8 export takes "
            "single-task checkpoints"
        )
