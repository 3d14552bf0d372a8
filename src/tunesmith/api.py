"""The public Python API: ``Config``, ``train``, ``evaluate``, ``predict``.

The CLI is a thin layer over these functions, so a notebook gets exactly what
the command line does::

    from tunesmith import Config, train
    result = train(Config.load("cfg.yaml", overrides=["optim.lr=3e-5"]))
    result.test_metrics["accuracy"]

Nothing inside the package imports this module (the recipe layer ``runs``
holds the implementations); it only names what users may rely on.
"""

from __future__ import annotations

from tunesmith.config.root import Config
from tunesmith.runs.load import load_checkpoint
from tunesmith.runs.predict import evaluate, predict
from tunesmith.runs.train import TrainResult, train

__all__ = ["Config", "TrainResult", "evaluate", "load_checkpoint", "predict", "train"]
