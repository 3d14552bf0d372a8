"""L2-SP, EWC and the Fisher, replay sampling, dropout overrides, students and teacher logits."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import toy_rows
from helpers import build_model
from tunesmith.config.root import Config
from tunesmith.data.batching import Collator
from tunesmith.errors import ConfigError
from tunesmith.models.dropout import dropout_changes
from tunesmith.models.loading import load_tokenizer
from tunesmith.objectives.distill.student import keep_indices, shrink
from tunesmith.objectives.distill.teacher import (
    TeacherLogits,
    compute_logits,
    load_cache,
    save_cache,
)
from tunesmith.objectives.regularize.fisher import estimate_fisher, load_ewc, save_ewc
from tunesmith.objectives.regularize.penalties import ewc, l2_sp
from tunesmith.objectives.regularize.replay import ReplaySampler
from tunesmith.tasks.base import get_task

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ewc_penalty_is_zero_at_start_and_grows_as_weights_move():
    layer = nn.Linear(3, 2)
    params = dict(layer.named_parameters())
    fisher = {"weight": torch.full((2, 3), 2.0), "bias": torch.tensor([0.0, 5.0])}
    anchors = {n: p.detach().clone() for n, p in params.items()}
    penalty = ewc(0.5, params, fisher, anchors)
    assert penalty.penalty().item() == 0.0
    values = []
    for step in (0.1, 0.2, 0.4):
        with torch.no_grad():
            layer.weight.copy_(anchors["weight"] + step)
        values.append(penalty.penalty().item())
    assert values[0] < values[1] < values[2]
    assert values[0] == pytest.approx(0.5 * 2.0 * 6 * 0.1**2, rel=1e-5)
    # The bias moves where its Fisher is zero: no penalty for that element.
    with torch.no_grad():
        layer.weight.copy_(anchors["weight"])
        layer.bias.copy_(anchors["bias"] + torch.tensor([1.0, 0.0]))
    assert penalty.penalty().item() == pytest.approx(0.0)
    # Gradients flow to the weights; frozen weights are left out.
    with torch.no_grad():
        layer.bias.copy_(anchors["bias"] + 1.0)
    penalty.penalty().backward()
    assert layer.bias.grad.tolist() == pytest.approx([0.0, 0.5 * 5.0 * 2 * 1.0])
    layer.bias.requires_grad_(False)
    assert penalty.penalty().item() == pytest.approx(0.0)


def test_gradcheck_anchor_penalty():
    weight = nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    anchor = {"w": torch.randn(3, 2, dtype=torch.float64)}
    fisher = {"w": torch.rand(3, 2, dtype=torch.float64)}

    def value(w: torch.Tensor) -> torch.Tensor:
        # The penalty reads its live parameter: evaluate it at ``w``.
        penalty = ewc(0.7, {"w": weight}, fisher, anchor)
        penalty.params = {"w": w}
        return penalty.penalty()

    assert torch.autograd.gradcheck(value, (weight.detach().clone().requires_grad_(True),))


class _TwoHeads(nn.Module):
    """A classifier whose second head never reaches the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 2)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(self.body(input_ids).mean(1)))


class _Task:
    @staticmethod
    def model_inputs(batch):
        return {"input_ids": batch["input_ids"]}

    @staticmethod
    def loss_sum(outputs, batch):
        return nn.functional.cross_entropy(outputs.logits, batch["labels"], reduction="sum")


def test_fisher_is_zero_where_no_gradient_reaches_and_positive_elsewhere():
    torch.manual_seed(0)
    model = _TwoHeads()
    features = [{"input_ids": [i, i + 1, 3], "labels": i % 2} for i in range(6)]
    params = dict(model.named_parameters())
    model.head.bias.requires_grad_(False)  # frozen now, estimated anyway, frozen again after
    fisher = estimate_fisher(model, _Task(), features, Collator(0), params, samples=4)
    assert torch.count_nonzero(fisher["unused.weight"]) == 0
    assert torch.count_nonzero(fisher["unused.bias"]) == 0
    assert (fisher["head.weight"] > 0).all() and (fisher["head.bias"] > 0).all()
    assert not model.head.bias.requires_grad and model.training
    assert all(p.grad is None for p in model.parameters())
    # By hand for one example: the squared gradient of its loss.
    one = estimate_fisher(model, _Task(), features[:1], Collator(0), params, samples=1)
    model.zero_grad()
    batch = Collator(0)([features[0]])
    _Task.loss_sum(model(batch["input_ids"]), batch).backward()
    assert torch.allclose(one["head.weight"], model.head.weight.grad**2)


def test_ewc_file_round_trip(tmp_path: Path):
    fisher = {"a.weight": torch.rand(2, 3)}
    anchors = {"a.weight": torch.rand(2, 3)}
    got_fisher, got_anchors = load_ewc(save_ewc(tmp_path, fisher, anchors))
    assert torch.equal(got_fisher["a.weight"], fisher["a.weight"])
    assert torch.equal(got_anchors["a.weight"], anchors["a.weight"])


def test_l2_sp_leaves_new_parameters_out_and_starts_at_zero():
    model = build_model("bert")
    model.tunesmith_new_parameters = ("classifier.weight", "classifier.bias")
    reg = l2_sp(0.1, model, model.named_parameters())
    assert not any(n.startswith("classifier") for n in reg.params)
    assert "bert.embeddings.word_embeddings.weight" in reg.params
    assert reg.penalty(model).item() == 0.0
    with torch.no_grad():
        model.bert.pooler.dense.bias.add_(1.0)
        model.classifier.bias.add_(5.0)  # not anchored: no penalty
    assert reg.penalty(model).item() == pytest.approx(0.1 * 16, rel=1e-5)


def test_replay_fraction_holds_over_an_epoch_and_is_reproducible():
    n_train, pool, fraction = 300, 40, 0.2
    lengths = [5 + i % 7 for i in range(n_train)]
    sampler = ReplaySampler(lengths, [3] * pool, fraction, 8, seed=3)
    seen: list[int] = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = sampler.order()
        assert len(order) == len(sampler)
        replayed = [i for i in order if i >= n_train]
        assert len(replayed) / len(order) == pytest.approx(fraction, abs=0.005)
        assert sorted(i for i in order if i < n_train) == list(range(n_train))
        seen.extend(replayed)
    # 75 a epoch from a pool of 40: each comes back before any is used once more.
    counts = {i: seen.count(i) for i in set(seen)}
    assert len(counts) == pool and max(counts.values()) - min(counts.values()) <= 1
    again = ReplaySampler(lengths, [3] * pool, fraction, 8, seed=3)
    again.set_epoch(2)
    assert again.order() == order
    again.set_epoch(1)
    assert again.order() != order
    assert len(ReplaySampler(lengths, [], 0.5, 8)) == n_train


def test_dropout_overrides_find_each_architectures_keys():
    bert = {"model_type": "bert", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    assert dropout_changes(bert, 0.3, 0.2) == {
        "hidden_dropout_prob": 0.3,
        "attention_probs_dropout_prob": 0.2,
    }
    gpt2 = {"model_type": "gpt2", "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}
    assert dropout_changes(gpt2, 0.0, None) == {"resid_pdrop": 0.0, "embd_pdrop": 0.0}
    llama = {"model_type": "llama", "attention_dropout": 0.0}
    assert dropout_changes(llama, None, 0.1) == {"attention_dropout": 0.1}
    with pytest.raises(ConfigError, match="llama has no such dropout setting; it has attention"):
        dropout_changes(llama, 0.1, None)
    t5 = {"model_type": "t5", "dropout_rate": 0.1}
    assert dropout_changes(t5, 0.2, None) == {"dropout_rate": 0.2}
    with pytest.raises(ConfigError, match="t5 has no such dropout setting; it has dropout_rate"):
        dropout_changes(t5, None, 0.2)
    assert dropout_changes(None, None, None) == {}


def test_dropout_override_reaches_the_loaded_model(tiny_bert: Path):
    cfg = Config.from_dict(
        {
            "model": {"name_or_path": str(tiny_bert)},
            "data": {"train": "x.csv"},
            "regularize": {"hidden_dropout": 0.3, "attention_dropout": 0.25},
        }
    )
    model = get_task(cfg).build_model(["neg", "pos"], load_tokenizer(str(tiny_bert)))
    assert model.config.hidden_dropout_prob == 0.3
    assert model.config.attention_probs_dropout_prob == 0.25
    assert model.bert.embeddings.dropout.p == 0.3


def test_student_keeps_the_chosen_blocks_and_reloads(tmp_path: Path):
    assert keep_indices(6, 3) == [0, 2, 5]
    assert keep_indices(6, 1) == [5]
    assert keep_indices(4, [3, 1]) == [1, 3]
    with pytest.raises(ConfigError, match="block 6 does not exist"):
        keep_indices(6, [0, 6])
    teacher = build_model("bert", layers=3).eval()
    student = build_model("bert", layers=3).eval()
    assert shrink(student, [0, 2]) == [0, 2]
    assert student.config.num_hidden_layers == 2
    same = teacher.bert.encoder.layer[2].attention.self.query.weight
    assert torch.equal(student.bert.encoder.layer[1].attention.self.query.weight, same)
    student.save_pretrained(tmp_path / "s", safe_serialization=True)
    from transformers import AutoModelForSequenceClassification

    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s").eval()
    ids = torch.tensor([[2, 7, 9, 3]])
    assert torch.allclose(again(input_ids=ids).logits, student(input_ids=ids).logits)


def _bert_task(model_dir: Path, kind: str):
    cfg = Config.from_dict(
        {"model": {"name_or_path": str(model_dir)}, "data": {"train": "x"}, "task": {"type": kind}}
    )
    return get_task(cfg)


@pytest.mark.parametrize("kind", ["sequence_classification", "token_classification"])
def test_cached_teacher_logits_equal_fresh_ones(tiny_bert: Path, tmp_path: Path, kind: str):
    task = _bert_task(tiny_bert, kind)
    tokenizer = load_tokenizer(str(tiny_bert))
    rows = toy_rows(10)
    if kind == "token_classification":
        records = [
            {"words": r["text"].split(), "tags": ["O"] * len(r["text"].split()), "source": "s"}
            for r in rows
        ]
        labels = ["O", "B-X", "I-X"]
    else:
        records, labels = rows, ["neg", "pos"]
    torch.manual_seed(0)
    teacher = task.build_model(labels, tokenizer).eval()
    features = task.encode(records, tokenizer, {lab: i for i, lab in enumerate(labels)})
    collator = Collator(tokenizer.pad_token_id)
    cached = compute_logits(teacher, task, features, collator, batch_size=3)
    save_cache(tmp_path / "t.safetensors", cached, "k1")
    assert load_cache(tmp_path / "t.safetensors", "other") is None
    cached = load_cache(tmp_path / "t.safetensors", "k1")
    batch = collator([{**features[i], "index": i} for i in (4, 1, 7)])
    with torch.no_grad():
        fresh = task.loss_logits(teacher(**task.model_inputs(batch)), batch)
    from_cache = TeacherLogits(task, cached).for_batch(batch, fresh.shape)
    live = TeacherLogits(task, model=teacher).for_batch(batch, fresh.shape)
    keep = batch["labels"] != -100
    assert torch.allclose(from_cache[keep], fresh[keep], atol=1e-5)
    assert torch.equal(live, fresh)
