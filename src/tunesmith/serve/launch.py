"""Starting the server: which checkpoints become which model ids, then uvicorn.

``tunesmith serve`` takes checkpoint folders (``NAME=PATH`` or ``PATH``: the id
is then the run folder's name, ``best``/``final`` left out) and/or an adapter
library folder (every checkpoint in it, by its folder name). The library is
also the only place the admin route may load from at run time.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tunesmith.errors import ConfigError
from tunesmith.serve.catalog import Catalog, library_models

log = logging.getLogger(__name__)

#: Checkpoint folder names that say nothing about the model: the id is the run's name.
_PLAIN = {"best", "final"}


def model_id(spec: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` -> (model id, folder)."""
    name, sep, path = spec.partition("=")
    if sep and name and path:
        return name, Path(path)
    folder = Path(spec)
    resolved = folder.resolve()
    return (resolved.parent.name if resolved.name in _PLAIN else resolved.name), folder


def build_catalog(
    checkpoints: list[str], library: Path | None, *, trust_remote_code: bool = False
) -> Catalog:
    """A catalog holding every checkpoint given and every checkpoint of ``library``.

    Raises:
        ConfigError: Nothing to serve, or two checkpoints under one id.
    """
    wanted: dict[str, Path] = dict(library_models(library)) if library is not None else {}
    for spec in checkpoints:
        name, folder = model_id(spec)
        if name in wanted:
            raise ConfigError(f"two checkpoints would be served as '{name}'; name one: NAME=PATH")
        wanted[name] = folder
    if not wanted:
        raise ConfigError("nothing to serve: give checkpoint folders or --library DIR")
    catalog = Catalog(library, trust_remote_code=trust_remote_code)
    for name, folder in wanted.items():
        catalog.add(name, folder)
    return catalog
