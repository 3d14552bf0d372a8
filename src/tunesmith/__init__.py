"""tunesmith: a fine-tuning controller for pretrained transformer models.

The public API (``Config``, ``train``, ``evaluate``, ``predict``) is imported
lazily so that ``import tunesmith`` and ``tunesmith --help`` stay fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Config", "TrainResult", "evaluate", "predict", "train"]


def __getattr__(name: str) -> Any:
    if name == "Config":
        from tunesmith.config import Config

        return Config
    if name in ("train", "evaluate", "predict", "TrainResult"):
        from tunesmith import api

        return getattr(api, name)
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")
