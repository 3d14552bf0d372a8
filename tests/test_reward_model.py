"""task.type reward_model: Bradley-Terry on pairs, plain-transformers reloads score the same."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from chat_fixtures import build_tiny_llama, write_jsonl
from conftest import build_tiny_bert
from test_preference import CHOSEN, REJECTED, pairs
from tunesmith.api import predict, train
from tunesmith.config.root import Config
from tunesmith.data.batching import Collator
from tunesmith.models.loading import load_tokenizer
from tunesmith.tasks.base import get_task
from tunesmith.training.monitor import read_metrics


def rm_config(model: Path, data_file: Path, out: Path, **train_keys: Any) -> dict[str, Any]:
    return {
        "model": {"name_or_path": str(model)},
        "task": {"type": "reward_model"},
        "data": {"train": str(data_file), "max_length": 64, "validation_fraction": 0.2},
        "method": {"name": "full"},
        "optim": {"lr": 2e-3, "warmup_ratio": 0.0, "weight_decay": 0.0},
        "train": {"epochs": 3, "batch_size": 8, "output_dir": str(out), **train_keys},
    }


def eos_padded_llama(folder: Path) -> Path:
    """The tiny Llama with its pad token set to EOS, as SmolLM2 ships."""
    build_tiny_llama(folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            data["pad_token"] = "<|im_end|>"
            path.write_text(json.dumps(data))
    config = json.loads((folder / "config.json").read_text())
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    config["pad_token_id"] = tokenizer.eos_token_id
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def plain_scores(folder: Path, texts: list[str]) -> list[float]:
    """Each text scored one at a time by plain transformers (no padding at all)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return [
            float(model(**tokenizer(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0])
            for t in texts
        ]


@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["pad", "pad-is-eos"])
def test_a_decoder_reward_model_learns_and_reloads_in_plain_transformers(tmp_path, pad_is_eos):
    folder = tmp_path / "llama"
    model = eos_padded_llama(folder) if pad_is_eos else build_tiny_llama(folder)
    data = write_jsonl(tmp_path / "p.jsonl", pairs(48))
    result = train(Config.from_dict(rm_config(model, data, tmp_path / "rm")), progress=False)
    val = [r for r in read_metrics(tmp_path / "rm" / "metrics.jsonl") if r["split"] == "validation"]
    assert val[-1]["pairwise_accuracy"] == 1.0 and val[-1]["margin"] > 0
    tokenizer = load_tokenizer(str(result.best_dir))
    chats = [
        [{"role": "user", "content": "Who are you? 3"}, {"role": "assistant", "content": reply}]
        for reply in (CHOSEN, REJECTED, "I am")
    ]
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
    ours = [row["score"] for row in predict(result.best_dir, texts)]  # one padded batch
    theirs = plain_scores(result.best_dir, texts)
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert ours[0] > ours[1]  # the chosen kind of reply scores higher


def test_an_encoder_reward_model_with_margins(tmp_path):
    model = build_tiny_bert(tmp_path / "bert")
    rows = [{**row, "margin": 0.5} for row in pairs(48)]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = Config.from_dict(rm_config(model, data, tmp_path / "rm"))
    train(cfg, progress=False)
    val = [r for r in read_metrics(tmp_path / "rm" / "metrics.jsonl") if r["split"] == "validation"]
    assert val[-1]["pairwise_accuracy"] == 1.0


def test_the_loss_is_bradley_terry_with_the_margin(tmp_path):
    model_dir = build_tiny_llama(tmp_path / "llama")
    rows = [{**row, "margin": m} for row, m in zip(pairs(3), (0.0, 1.0, -2.0), strict=True)]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = Config.from_dict(rm_config(model_dir, data, tmp_path / "rm"))
    task = get_task(cfg)
    tokenizer = load_tokenizer(str(model_dir))
    model = task.build_model([], tokenizer).eval()
    features = task.encode(task.load_records(str(data)), tokenizer, None)
    batch = Collator(tokenizer.pad_token_id, "right")(features)
    rewards = task.forward(model, batch)
    with torch.no_grad():
        single = [
            float(model(input_ids=torch.tensor([f[key]])).logits[0, 0])
            for key in ("input_ids", "rejected_input_ids")
            for f in features
        ]
    torch.testing.assert_close(rewards.detach(), torch.tensor(single), atol=1e-5, rtol=0)
    chosen, rejected = torch.tensor(single[:3]), torch.tensor(single[3:])
    expected = -F.logsigmoid(chosen - rejected - torch.tensor([0.0, 1.0, -2.0])).sum()
    assert float(task.loss_sum(rewards, batch)) == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.slow
def test_a_smollm2_reward_model_scores_like_plain_transformers(tmp_path):
    """The real SmolLM2 (pad id = EOS id): two steps, then plain transformers scores the same."""
    from tunesmith.assets.locate import SMOLLM2, locate

    model = locate(SMOLLM2)
    tokenizer = load_tokenizer(str(model))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    data = write_jsonl(tmp_path / "p.jsonl", pairs(12))
    cfg = rm_config(model, data, tmp_path / "rm", max_steps=2, batch_size=4)
    cfg["method"] = {"name": "freeze", "train_layers": 1}
    result = train(Config.from_dict(cfg), progress=False, test=False)
    chats = [
        [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": reply}]
        for reply in (CHOSEN, REJECTED, "A bot.")
    ]
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
    ours = [row["score"] for row in predict(result.best_dir, texts)]
    assert ours == pytest.approx(plain_scores(result.best_dir, texts), abs=1e-4)
