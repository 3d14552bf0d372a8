"""Loading what a run saved: a ``best/`` or ``final/`` folder back into a model.

Checkpoints come in several shapes (plain transformers folders, peft adapters
with their trained head, int8 and pruned exports, QLoRA adapters over a
quantized base); this module is the one place that knows them all, so tasks,
evaluation, deployment and studies load a checkpoint the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunesmith.config.root import Config
from tunesmith.errors import DataError
from tunesmith.methods.base import METHODS
from tunesmith.models.loading import (
    check_base_model,
    check_weights,
    checkpoint_manifest,
    load_tokenizer,
    quiet_transformers,
)
from tunesmith.models.pruned_format import is_pruned, load_pruned
from tunesmith.models.quantize import is_quantized, load_quantized
from tunesmith.tasks.base import Task, get_task


def load_checkpoint(
    checkpoint: str | Path, *, trust_remote_code: bool = False, allow_unsafe_weights: bool = False
) -> tuple[Config, Task, Any, Any, list[str]]:
    """Config, task, model, tokenizer and labels of a saved ``best/``/``final/`` folder.

    The two permissions come from the caller, never from the checkpoint's own
    manifest: a folder received from someone else must not be able to switch
    on remote code or pickle loading by saying so in its ``tunesmith.json``.
    """
    quiet_transformers()
    folder = Path(checkpoint)
    manifest = checkpoint_manifest(folder)
    saved = Config.from_dict(manifest["config"], source=str(folder / "tunesmith.json"))
    permissions = {
        "trust_remote_code": trust_remote_code,
        "allow_unsafe_weights": allow_unsafe_weights,
    }
    cfg = saved.model_copy(update={"model": saved.model.model_copy(update=permissions)})
    task = get_task(cfg)
    check_weights(folder, allow_unsafe_weights=cfg.model.allow_unsafe_weights)
    if METHODS.get(cfg.method.name).saves_adapter:
        check_base_model(folder, manifest)
    tokenizer = load_tokenizer(str(folder))
    tokenizer.padding_side = manifest.get("padding_side", tokenizer.padding_side)
    labels = list(manifest.get("labels", []))
    task.class_weights = manifest.get("class_weights")
    task.restore_state(manifest.get("task_state") or {})
    model = load_trained(task, str(folder), labels, tokenizer)
    return cfg, task, model, tokenizer, labels


def records_for(
    task: Task, cfg: Config, checkpoint: str | Path, data: str | None, split: str | None
) -> list[dict[str, Any]]:
    """Records of a data file, or of the validation/test split of the checkpoint's run."""
    if (data is None) == (split is None):
        raise DataError("give exactly one of a data file or --split validation|test")
    if data is not None:
        return task.load_records(data)
    run_dir = Path(checkpoint).resolve().parent
    prov_path = run_dir / "splits.json"
    if not prov_path.is_file():
        raise DataError(f"{prov_path}: not found; give the data file instead of --split")
    try:
        provenance = json.loads(prov_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise DataError(f"{prov_path}: unreadable ({err}); give the data file instead") from None
    return task.split_records(provenance, str(split), prov_path)


def load_trained(task: Task, path: str, labels: Sequence[str], tokenizer: Any) -> Any:
    """The model saved in ``path`` by a run of ``task``, whatever its format.

    An int8 export (``deploy.quantize``) is built from its config with int8
    modules swapped in; a structurally pruned model (``deploy.pruned_format``)
    is built from its config and sliced to the heads and neurons it kept; any
    other folder is the task's own layout (a transformers folder, or an
    adapter and head on the configured base: ``Task.load_saved``).
    """
    trust = task.cfg.model.trust_remote_code
    if is_quantized(path):
        model = load_quantized(path, task.auto_class(), trust_remote_code=trust)
    elif is_pruned(path):
        model = load_pruned(path, task.auto_class(), trust_remote_code=trust)
    else:
        model = task.load_saved(path, labels, tokenizer, METHODS.get(task.cfg.method.name))
    task.loaded(model, tokenizer, path)
    return model
