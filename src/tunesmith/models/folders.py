"""Writing loadable model folders (``best/``, ``final/``) atomically.

A folder is written to ``<name>.tmp`` first; only a complete folder is renamed
into place (the previous one is moved aside and deleted afterwards), so a
crash at any moment leaves a whole old or a whole new folder, never a mix.
A crash in the instant between the two renames leaves only ``<name>.old``;
``recover_dir`` (run by every writer and reader) puts it back.
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
    tmp = start_dir_write(target)
    write(tmp)
    return finish_dir_write(target)


def staging_dir(target: Path) -> Path:
    """Where ``target`` is written before it is swapped into place."""
    target = Path(target)
    return target.with_name(target.name + ".tmp")


def start_dir_write(target: Path) -> Path:
    """The first half of ``atomic_dir_write``: an empty staging folder (stale ones removed).

    Split from the swap so that several processes can write into the staging
    folder (each its shard of a checkpoint) before one of them swaps it in.
    """
    target = recover_dir(Path(target))
    tmp, old = staging_dir(target), target.with_name(target.name + ".old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    return tmp


def finish_dir_write(target: Path) -> Path:
    """The second half of ``atomic_dir_write``: flush the staging folder and swap it in."""
    target = Path(target)
    tmp, old = staging_dir(target), target.with_name(target.name + ".old")
    _fsync_dir(tmp, deep=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    _fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old)
    return target


def write_new_folder(output: Path, write: Callable[[Path], None]) -> Path:
    """``atomic_dir_write`` for an export: a failed write leaves no ``<output>.tmp`` behind.

    Exports check what they wrote before it appears (an ONNX graph's parity, a
    GGUF file read back): when a check raises, nothing is left to mistake for
    a result.
    """
    try:
        return atomic_dir_write(output, write)
    except BaseException:
        shutil.rmtree(output.with_name(output.name + ".tmp"), ignore_errors=True)
        raise


def recover_dir(target: Path) -> Path:
    """Put ``<target>.old`` back when a crash left it without a ``target`` to replace it."""
    target = Path(target)
    old = target.with_name(target.name + ".old")
    if not target.exists() and old.is_dir():
        old.rename(target)
    return target


def save_model_folder(
    target: Path,
    save_weights: Callable[[Path], None],
    tokenizer: Any,
    manifest: Mapping[str, Any],
) -> Path:
    """Save weights (via the method), tokenizer and our manifest into ``target``, atomically.

    Full and freeze runs give a plain transformers folder that loads with
    ``AutoModelFor*.from_pretrained`` without tunesmith; adapter methods give
    a peft-style adapter folder. ``tunesmith.json`` adds what neither keeps
    (task, data columns, labels, base model, metrics, size).
    """

    def write(tmp: Path) -> None:
        save_weights(tmp)
        tokenizer.save_pretrained(tmp)
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        meta = {
            **manifest,
            "weights_mb": round(_weights_bytes(tmp) / 2**20, 3),
            "folder_mb": round(size / 2**20, 3),
        }
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=2, default=str) + "\n")

    return atomic_dir_write(target, write)


def _weights_bytes(folder: Path) -> int:
    """Bytes of the weight files (``*.safetensors``) in ``folder`` and its sub-folders.

    Sub-folders: a multi-task model saves ``encoder/`` and ``heads/``.
    """
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The ``tunesmith.json`` of a saved folder, or an empty dict for foreign folders."""
    path = recover_dir(Path(folder)) / MANIFEST
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _fsync_dir(path: Path, *, deep: bool = False) -> None:
    """Flush every file in ``path`` and the directory entry itself to disk.

    ``deep``: the files of its sub-folders too (a multi-task model's ``heads/``).
    """
    for child in path.iterdir():
        if deep and child.is_dir():
            _fsync_dir(child, deep=True)
        elif child.is_file():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
