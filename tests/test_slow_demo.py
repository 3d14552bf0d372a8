"""End to end on the real offline MiniLM and Rotten Tomatoes reviews (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tunesmith.api import evaluate, predict, train
from tunesmith.demo import demo_config

pytestmark = pytest.mark.slow


def test_minilm_rotten_tomatoes_subset(tmp_path: Path):
    cfg = demo_config(
        str(tmp_path / "demo"),
        [
            "data.max_train_samples=2000",
            "data.validation_fraction=0.05",
            "data.test_fraction=0.05",
            "train.eval_steps=125",  # one evaluation, at the end
        ],
    )
    result = train(cfg, progress=False)
    assert result.parameters[-1]["parameters"] > 22_000_000  # the real MiniLM, not a toy
    assert result.test_metrics["accuracy"] >= 0.72
    assert result.loop.steps == 125  # 2,000 rows / 16, one epoch

    # Re-evaluating the best checkpoint reproduces the logged validation metric.
    again = evaluate(result.best_dir, split="validation")
    assert again["accuracy"] == result.validation_metrics["accuracy"]

    # Plain transformers on the saved folder predicts what tunesmith predicts.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = [
        "A triumph: funny, moving and beautifully acted.",
        "Tedious, shapeless and far too long.",
        "An instant classic.",
        "The worst film of the year.",
    ]
    ours = [r["label"] for r in predict(result.best_dir, texts)]
    model = AutoModelForSequenceClassification.from_pretrained(result.best_dir).eval()
    tok = AutoTokenizer.from_pretrained(result.best_dir)
    with torch.no_grad():
        ids = model(**tok(texts, padding=True, return_tensors="pt")).logits.argmax(-1)
    assert ours == [model.config.id2label[i] for i in ids.tolist()]
    assert ours[0] == "fresh" and ours[1] == "rotten"
