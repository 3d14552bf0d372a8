"""tunesmith: a fine-tuning controller for pretrained transformer models.

The public API (``Config``, ``train``, ``evaluate``, ``predict``) is imported
lazily so that ``import tunesmith`` and ``tunesmith --help`` stay fast. No
subpackage is named like a public function, so importing one (``tunesmith.
training``, ``tunesmith.evaluation``) never shadows ``tunesmith.train``.
"""

from __future__ import annotations

from typing import Any

from tunesmith._version import __version__

__all__ = ["Config", "TrainResult", "__version__", "evaluate", "predict", "train"]


def __getattr__(name: str) -> Any:
    if name in ("Config", "train", "evaluate", "predict", "TrainResult"):
        from tunesmith import api

        return getattr(api, name)
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")
