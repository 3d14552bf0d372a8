"""End to end on the real offline MiniLM and Rotten Tomatoes reviews (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunesmith.api import evaluate, predict
from tunesmith.runs.demo import demo_config

pytestmark = pytest.mark.slow


def test_minilm_rotten_tomatoes_subset(tmp_path: Path):
    """The demo on 2,000 reviews, trained by the CLI in a fresh process.

    A fresh process also makes its peak memory the run's own: ``tunesmith
    estimate``, run first in its own process, must be within 30% of it.
    """
    cfg = demo_config(
        str(tmp_path / "demo"),
        [
            "data.max_train_samples=2000",
            "data.validation_fraction=0.05",
            "data.test_fraction=0.05",
            "train.eval_steps=125",  # one evaluation, at the end
            "train.precision=fp32",
        ],
    )
    path = cfg.save(tmp_path / "demo.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    exe = [sys.executable, "-m", "tunesmith.cli", "-q"]
    est = json.loads(
        subprocess.run(
            [*exe, "estimate", str(path), "--json", "--steps", "2"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout
    )
    assert est["total_parameters"] == 22_713_986  # the real MiniLM, not a toy
    subprocess.run([*exe, "train", str(path), "--no-progress"], env=env, check=True)
    run = tmp_path / "demo"
    summary = json.loads((run / "summary.json").read_text())
    measured = summary["peak_rss_mb"] * 2**20
    assert abs(est["total"] - measured) <= 0.3 * measured, (est["total"] / 2**20, measured / 2**20)
    assert summary["test"]["accuracy"] >= 0.72
    assert summary["steps"] == 125  # 2,000 rows / 16, one epoch

    # Re-evaluating the best checkpoint reproduces the logged validation metric.
    best = run / "best"
    again = evaluate(best, split="validation")
    assert again["accuracy"] == summary["validation"]["accuracy"]

    # Plain transformers on the saved folder predicts what tunesmith predicts.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = [
        "A triumph: funny, moving and beautifully acted.",
        "Tedious, shapeless and far too long.",
        "An instant classic.",
        "The worst film of the year.",
    ]
    ours = [r["label"] for r in predict(best, texts)]
    model = AutoModelForSequenceClassification.from_pretrained(best).eval()
    tok = AutoTokenizer.from_pretrained(best)
    with torch.no_grad():
        ids = model(**tok(texts, padding=True, return_tensors="pt")).logits.argmax(-1)
    assert ours == [model.config.id2label[i] for i in ids.tolist()]
    assert ours[0] == "fresh" and ours[1] == "rotten"
