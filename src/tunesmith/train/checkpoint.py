"""Writing loadable model folders (``best/``, ``final/``) atomically.

A folder is written to ``<name>.tmp`` first; only a complete folder is renamed
into place (the previous one is moved aside and deleted afterwards), so a
crash at any moment leaves a whole old or a whole new folder, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

MANIFEST = "tunesmith.json"


def atomic_dir_write(target: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` then swap ``tmp_dir`` into ``target``."""
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    old = target.with_name(target.name + ".old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    write(tmp)
    _fsync_dir(tmp)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    _fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old)
    return target


def save_model_folder(
    target: Path,
    model: Any,
    tokenizer: Any,
    manifest: Mapping[str, Any],
) -> Path:
    """Save a plain transformers folder (safetensors + config + tokenizer) plus our manifest.

    The folder loads with ``AutoModelFor*.from_pretrained`` without tunesmith;
    ``tunesmith.json`` adds what transformers does not keep (task, data
    columns, max length, the metrics at save time).
    """

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")

    return atomic_dir_write(target, write)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The ``tunesmith.json`` of a saved folder, or an empty dict for foreign folders."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _fsync_dir(path: Path) -> None:
    """Flush every file in ``path`` and the directory entry itself to disk."""
    for child in path.iterdir():
        if child.is_file():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
