"""Shared fixtures: a tiny random BERT saved as a real model folder, and toy data.

The tiny model is built from a config (no download), saved with safetensors
and a WordPiece tokenizer, so every code path (loading, saving, reloading)
runs exactly as on a real checkpoint, in milliseconds.
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSITIVE = ["good", "great", "fine", "superb", "lovely", "fun"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak"]
FILLER = ["the", "movie", "film", "was", "a", "plot", "story", "and", "very", "really", "it"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def toy_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Sentences whose label is given by one sentiment word among filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        word = rng.choice(POSITIVE if label == "pos" else NEGATIVE)
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 12))]
        words.insert(rng.randint(0, len(words)), word)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    """Write rows (dicts with the same keys) as CSV with a header."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def build_tiny_bert(
    folder: Path,
    *,
    dropout: float = 0.0,
    num_layers: int = 2,
    vocab: list[str] | None = None,
) -> Path:
    """Save a random-initialised BERT (hidden 32) and a WordPiece tokenizer to ``folder``.

    ``vocab`` replaces the sentiment words (special tokens first, as BERT expects).
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    if vocab is None:
        vocab = (
            SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER)) + list("abcdefghijklmnopqrstuvwxyz")
        )
    tokenizer = BertTokenizerFast(vocab={tok: i for i, tok in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(1234)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=0,
    )
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random BERT encoder (no head) with tokenizer, dropout off."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run many times faster on one thread on a busy machine; restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def toy_csv(tmp_path: Path) -> Path:
    """A learnable 2-class CSV of 240 short sentences."""
    return write_csv(tmp_path / "toy.csv", toy_rows(240))


def tiny_config(model: Path, data_file: Path, out: Path, **sections: dict) -> dict:
    """A config dict for fast runs on the tiny model; sections override defaults."""
    cfg = {
        "model": {"name_or_path": str(model)},
        "data": {"train": str(data_file), "max_length": 32},
        "optim": {"lr": 2e-3, "warmup_ratio": 0.0},
        "train": {
            "epochs": 8,
            "batch_size": 16,
            "output_dir": str(out),
            "log_steps": 5,
            "early_stopping_patience": None,
        },
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


@pytest.fixture(scope="session")
def tiny_runs(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``best/`` of a one-epoch full, LoRA and bottleneck run on the tiny BERT, by method."""
    from tunesmith.api import train
    from tunesmith.config.root import Config

    tmp = tmp_path_factory.mktemp("tiny-runs")
    data = write_csv(tmp / "train.csv", toy_rows(40))
    out = {}
    for method in ("full", "lora", "bottleneck"):
        cfg = tiny_config(tiny_bert, data, tmp / method, method={"name": method})
        cfg["train"]["epochs"] = 1
        out[method] = train(Config.from_dict(cfg), progress=False).best_dir
    return out
