"""The TRL benchmark's SFT pair on a tiny Llama: both sides train the same tokens, TRL as oracle."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chat_fixtures import build_tiny_llama, write_jsonl
from tunesmith.studies.bench.llm import LLMSpec
from tunesmith.studies.bench.llm_pairs import prepare, run_contender

pytest.importorskip("trl")

QUESTIONS = ["What is your name?", "Where do you live?", "How old are you?", "Tell me a joke."]


def test_sft_pair_trains_the_same_tokens_on_both_sides(tmp_path: Path):
    model = build_tiny_llama(tmp_path / "llama")
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"{QUESTIONS[i % 4]} {i}"},
                {"role": "assistant", "content": "I am a tiny bot." * (1 + i % 3)},
            ]
        }
        for i in range(40)
    ]
    data = write_jsonl(tmp_path / "chats.jsonl", chats)
    config = tmp_path / "sft.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(model)},
                "task": {"type": "causal_lm"},
                "data": {"train": str(data), "max_length": 64, "validation_fraction": 0.2},
                "method": {"name": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]},
                "optim": {"lr": 1e-3, "scheduler": "cosine", "warmup_ratio": 0.1},
                "train": {"batch_size": 4, "seed": 0, "output_dir": str(tmp_path / "unused")},
            }
        )
    )
    base = LLMSpec("prepare", "sft", str(config), str(tmp_path / "work"), rows=24, threads=1)
    prep = prepare(base)
    assert prep["counts"]["train"]["rows"] == 24
    results = {}
    for who in ("trl", "tunesmith"):
        spec = LLMSpec(who, "sft", str(config), str(tmp_path / who), prep["files"], threads=1)
        results[who] = run_contender(spec)
    trl, ours = results["trl"], results["tunesmith"]
    assert trl["steps"] == ours["steps"] == 6
    # The same chats, tokenised once: the same real and trained tokens from both samplers.
    assert (
        trl["trained_tokens"] == ours["trained_tokens"] == prep["counts"]["train"]["trained_tokens"]
    )
    assert trl["real_tokens"] == ours["real_tokens"] == prep["counts"]["train"]["real_tokens"]
    # Same model and data: validation losses of the same size (different batch orders).
    assert abs(trl["validation_loss"] / ours["validation_loss"] - 1) < 0.05


def test_dpo_pair_trains_the_same_pairs_and_reply_tokens(tmp_path: Path):
    from test_preference import pairs

    model = build_tiny_llama(tmp_path / "llama")
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(40))
    config = tmp_path / "dpo.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(model)},
                "task": {"type": "preference"},
                "preference": {"beta": 0.5},
                "data": {"train": str(data), "max_length": 64, "validation_fraction": 0.2},
                "method": {"name": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]},
                "optim": {"lr": 5e-3, "weight_decay": 0.0, "warmup_ratio": 0.1},
                "train": {"batch_size": 4, "seed": 0, "output_dir": str(tmp_path / "unused")},
            }
        )
    )
    base = LLMSpec("prepare", "dpo", str(config), str(tmp_path / "work"), rows=24, threads=1)
    prep = prepare(base)
    counts = prep["counts"]["train"]
    assert counts["rows"] == 24
    results = {}
    for who in ("trl", "tunesmith"):
        spec = LLMSpec(who, "dpo", str(config), str(tmp_path / who), prep["files"], threads=1)
        results[who] = run_contender(spec)
    trl, ours = results["trl"], results["tunesmith"]
    assert trl["steps"] == ours["steps"] == 6
    assert trl["pairs"] == ours["pairs"] == 24
    # TRL tokenised the same rows into the same reply tokens as tunesmith's features.
    assert trl["trained_tokens"] == counts["trained_tokens"]
    assert trl["real_tokens"] == ours["real_tokens"] == counts["real_tokens"]
    assert 0.0 <= trl["reward_accuracy"] <= 1.0 and ours["reward_accuracy"] > 0.5
