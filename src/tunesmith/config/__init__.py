"""The run configuration: ``from tunesmith.config import Config``.

``Config`` (``config/root.py``) is imported on first use, so that importing a
small part of this package (the task and method specs, one section) does not
build every section's model.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Config"]


def __getattr__(name: str) -> Any:
    if name == "Config":
        from tunesmith.config.root import Config

        return Config
    raise AttributeError(f"module 'tunesmith.config' has no attribute {name!r}")
