"""``tunesmith export``: a checkpoint as a standalone model folder.

With ``--merge``, LoRA/DoRA/IA3 updates are folded into the base weights and
the result is a plain transformers folder (no peft, no tunesmith needed).
Prefix and prompt tuning cannot be merged (their virtual tokens are inputs,
not weights) and neither can bottleneck adapters (the non-linearity between
their down and up projections cannot be folded into a linear weight): those
export unmerged, as the adapter folder plus the name of its base model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tunesmith.deploy.plain import merged_manifest
from tunesmith.errors import ConfigError
from tunesmith.methods.base import METHODS
from tunesmith.models.folders import read_manifest, save_model_folder
from tunesmith.runs.load import load_checkpoint


def export(checkpoint: str | Path, output: str | Path, *, merge: bool = False) -> Path:
    """Write ``checkpoint`` to ``output``, merged into a plain model when asked and possible.

    Raises:
        ConfigError: ``output`` exists, or ``merge`` was asked for a method that
            cannot be merged (the message says why).
    """
    output = Path(output)
    if output.exists():
        raise ConfigError(f"export: {output} already exists; choose a new folder")
    manifest = read_manifest(checkpoint)
    cfg, _task, model, tokenizer, _labels = load_checkpoint(checkpoint)
    method = METHODS.get(cfg.method.name)
    if not merge or not method.saves_adapter:
        shutil.copytree(checkpoint, output)
        return output
    merged = method.merged(model)
    if merged is None:
        raise ConfigError(
            f"export --merge: method '{cfg.method.name}' cannot be merged into the base "
            f"weights ({method.merge_blocker}); export without --merge"
        )
    return save_model_folder(
        output,
        lambda folder: merged.save_pretrained(folder, safe_serialization=True),
        tokenizer,
        merged_manifest(manifest),
    )
