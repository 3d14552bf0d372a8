"""The demo run: MiniLM-L6 fine-tuned on Rotten Tomatoes sentiment, offline.

The review file also holds ~1,100 long plot summaries that are not reviews;
``data.labels`` keeps only fresh/rotten rows. 10% of the reviews are held out
as a test split that training never sees, 10% more as validation for picking
the best checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunesmith.assets.locate import MINILM, ROTTEN_TOMATOES, locate
from tunesmith.config.root import Config


def demo_settings(output_dir: str) -> dict[str, Any]:
    """The demo's config as a dict (asset paths resolved on this machine)."""
    return {
        "model": {"name_or_path": str(locate(MINILM))},
        "task": {"type": "sequence_classification"},
        "data": {
            "train": str(locate(ROTTEN_TOMATOES)),
            "text_column": "text",
            "label_column": "category",
            "labels": ["fresh", "rotten"],
            "max_length": 64,
            "validation_fraction": 0.1,
            "test_fraction": 0.1,
        },
        "method": {"name": "full"},
        "optim": {"lr": 5e-5, "weight_decay": 0.01, "scheduler": "linear", "warmup_ratio": 0.06},
        "train": {
            "epochs": 1,
            "batch_size": 16,
            "eval_steps": 200,
            "precision": "auto",
            "seed": 0,
            "output_dir": output_dir,
        },
        "eval": {"metric": "accuracy"},
    }


def demo_config(output_dir: str = "runs/demo", overrides: Sequence[str] = ()) -> Config:
    """The demo config with command-line overrides applied."""
    return Config.from_dict(demo_settings(output_dir), source="demo", overrides=overrides)
