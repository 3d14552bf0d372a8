"""Padding-free (packed) causal-LM batches: same logits, loss and gradients as padded ones.

A tiny Llama is run on the same chats once as a right-padded batch with an
attention mask and once packed into one row with restarting position_ids; the
packed row must reproduce every example's logits, the loss sum, the number of
targets and the gradients, which can only hold if attention stays within
each example. A real run with ``data.padding_free`` trains, and the
refusals name the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chat_fixtures import build_tiny_llama, write_jsonl
from test_causal_lm import chats, sft_config
from tunesmith.api import train
from tunesmith.config.root import Config
from tunesmith.data.batching import Collator
from tunesmith.data.packing import PackedCollator, real_tokens
from tunesmith.errors import ConfigError
from tunesmith.models.loading import load_tokenizer
from tunesmith.tasks.base import get_task
from tunesmith.tasks.losses import IGNORE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-packing"))


@pytest.fixture(scope="module")
def encoded(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    """Task, model and 6 encoded chats of different lengths (long questions vary more)."""
    tmp = tmp_path_factory.mktemp("packing-data")
    rows = chats(6, seed=3)
    for i, row in enumerate(rows):
        row["prompt"] += " and more" * i
    data = write_jsonl(tmp / "c.jsonl", rows)
    cfg = sft_config(tiny_llama, data, tmp / "o", data={"max_length": 128})
    task = get_task(cfg)
    tokenizer = load_tokenizer(str(tiny_llama))
    features = task.encode(load_chats_of(task, data), tokenizer, None)
    torch.manual_seed(0)
    model = task.build_model([], tokenizer).float().eval()
    return task, model, tokenizer, features


def load_chats_of(task, path: Path) -> list[dict]:
    return task.load_records(str(path))


def test_packed_row_reproduces_each_examples_logits(encoded):
    task, model, tokenizer, features = encoded
    lengths = [len(f["input_ids"]) for f in features]
    assert len(set(lengths)) > 3  # padding would matter
    padded = Collator(tokenizer.pad_token_id, "right")(features)
    packed = PackedCollator()(features)
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    with torch.no_grad():
        a = model(**task.model_inputs(padded)).logits
        b = model(**task.model_inputs(packed)).logits
    start = 0
    for row, n in enumerate(lengths):
        torch.testing.assert_close(b[0, start : start + n], a[row, :n], atol=1e-5, rtol=0)
        start += n


def test_packed_loss_targets_and_gradients_equal_the_padded_batch(encoded):
    task, model, tokenizer, features = encoded
    padded = Collator(tokenizer.pad_token_id, "right")(features)
    packed = PackedCollator()(features)
    # The first label of each example is never a target: no prediction across a boundary.
    starts = torch.tensor([0, *torch.tensor([len(f["input_ids"]) for f in features]).cumsum(0)])
    assert (packed["labels"][0, starts[:-1]] == IGNORE).all()
    assert task.count_targets(packed) == task.count_targets(padded) > 0
    grads, losses = [], []
    for batch in (padded, packed):
        model.zero_grad()
        loss = task.loss_sum(model(**task.model_inputs(batch)), batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-6)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad()
    assert real_tokens(packed) == real_tokens(padded) == int(padded["attention_mask"].sum())


def test_a_padding_free_run_trains_on_real_tokens_only(tiny_llama: Path, tmp_path: Path):
    data = write_jsonl(tmp_path / "c.jsonl", chats(48))
    runs = {}
    for free in (False, True):
        out = tmp_path / f"free-{free}"
        cfg = sft_config(
            tiny_llama, data, out, data={"padding_free": free}, train={"epochs": 2, "seed": 1}
        )
        runs[free] = train(cfg, progress=False)
        assert runs[free].best_dir is not None
    logs = {
        free: [
            json.loads(line)
            for line in (tmp_path / f"free-{free}" / "metrics.jsonl").read_text().splitlines()
        ]
        for free in runs
    }
    train_rows = {
        free: [r for r in rows if r.get("split") == "train"] for free, rows in logs.items()
    }
    # Same examples, same order, same targets: the losses agree step by step (to float
    # rounding, which lr 1e-2 amplifies a little over the steps).
    for a, b in zip(train_rows[False], train_rows[True], strict=True):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-3 * a["loss"], (a, b)
    val = {
        free: [r for r in rows if r.get("split") == "validation"][-1] for free, rows in logs.items()
    }
    assert abs(val[True]["loss"] - val[False]["loss"]) < 1e-3 * val[False]["loss"]


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({}, "data.padding_free: only for task.type causal_lm"),
        ({"method": {"name": "prefix"}}, "method prefix adds virtual tokens per row"),
    ],
    ids=["encoder-task", "prefix"],
)
def test_padding_free_is_refused_where_packing_would_change_results(
    tiny_llama, tmp_path, sections, message
):
    cfg = sft_config(tiny_llama, tmp_path / "c.jsonl", tmp_path / "o").model_dump(mode="json")
    cfg["data"]["padding_free"] = True
    if not sections:
        cfg["task"] = {"type": "sequence_classification"}
        cfg.pop("generate")
    for name, values in sections.items():
        cfg[name] = values
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(cfg)
