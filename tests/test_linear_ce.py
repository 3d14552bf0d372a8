"""The LM head applied inside the loss (labelled positions, in chunks) equals the plain loss.

Loss and every gradient within 1e-5 (relative) of building all the logits and
calling ``F.cross_entropy``, in fp32: with label smoothing, with a bias, with
chunks smaller than the batch, and through a whole causal LM with tied input
and output embeddings under full fine-tuning.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from chat_fixtures import build_tiny_llama
from tunesmith.config.root import Config
from tunesmith.tasks.base import get_task
from tunesmith.tasks.lm_head import HiddenOutputs, output_head
from tunesmith.tasks.losses.linear_ce import linear_cross_entropy_sum, linear_token_losses


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal within ``rel`` of the larger magnitude (max norm)."""
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-12)
    return (a - b).abs().max().item() <= rel * scale


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [7, 1000])
def test_loss_and_gradients_equal_the_plain_cross_entropy(eps: float, bias: bool, rows: int):
    torch.manual_seed(0)
    n, h, v = 45, 24, 301
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    b = torch.randn(v, requires_grad=True) if bias else None
    targets = torch.randint(0, v, (n,))
    leaves = [x for x in (hidden, weight, b) if x is not None]

    plain = F.cross_entropy(
        F.linear(hidden, weight, b), targets, label_smoothing=eps, reduction="sum"
    )
    want = torch.autograd.grad(plain * 0.37, leaves)  # a scale, as the loop's normaliser
    ours = linear_cross_entropy_sum(hidden, weight, b, targets, eps, rows=rows)
    got = torch.autograd.grad(ours * 0.37, leaves)

    assert close(ours.detach(), plain.detach())
    for g_want, g_got in zip(want, got, strict=True):
        assert close(g_got, g_want)
    per_token = linear_token_losses(hidden, weight, b, targets, eps, rows=rows)
    plain_rows = F.cross_entropy(
        F.linear(hidden, weight, b), targets, label_smoothing=eps, reduction="none"
    )
    assert close(per_token, plain_rows.detach())


def test_frozen_head_gets_no_gradient_and_no_grad_mode_gives_the_sum():
    torch.manual_seed(1)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(50, 8)  # frozen (LoRA leaves the head alone)
    targets = torch.randint(0, 50, (10,))
    loss = linear_cross_entropy_sum(hidden, weight, None, targets)
    (grad,) = torch.autograd.grad(loss, [hidden])
    assert weight.grad is None and torch.isfinite(grad).all()
    with torch.no_grad():
        assert close(linear_cross_entropy_sum(hidden, weight, None, targets), loss.detach())


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-lce"))


def causal_task(model: Path, head_in_loss: bool, eps: float = 0.1):
    cfg = Config.from_dict(
        {
            "model": {"name_or_path": str(model)},
            "task": {"type": "causal_lm", "head_in_loss": head_in_loss, "label_smoothing": eps},
            "data": {"train": "unused.jsonl"},
            "method": {"name": "full"},
        }
    )
    return get_task(cfg)


def batch_of(vocab: int) -> dict[str, torch.Tensor]:
    """Three rows, one padded, prompts masked: labels only on the 'reply' positions."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (3, 21), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    labels = ids.clone()
    labels[:, :9] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_causal_lm_with_tied_embeddings_matches_the_model_logits(tiny_llama: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    batch = batch_of(model.config.vocab_size)
    results = {}
    for head_in_loss in (False, True):
        task = causal_task(tiny_llama, head_in_loss)
        model.zero_grad()
        outputs = task.forward(model, batch)
        assert isinstance(outputs, HiddenOutputs) is head_in_loss
        loss = task.loss_sum(outputs, batch)
        (loss / task.count_targets(batch)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            preds = task.outputs_to_predictions(task.forward(model, batch), batch)
        results[head_in_loss] = (loss.detach(), grads, preds)
    (loss_a, grads_a, preds_a), (loss_b, grads_b, preds_b) = results[False], results[True]
    assert close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert close(grads_b[name], grads_a[name]), name
    assert torch.equal(preds_a["targets"], preds_b["targets"])
    assert close(preds_b["nll_sum"], preds_a["nll_sum"])


def test_head_is_left_to_the_model_where_deferring_it_is_not_exact(tiny_llama: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert output_head(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0  # logits transformed after the head
    assert output_head(model) is None
    model.config.final_logit_softcapping = None
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    assert output_head(wrapped) is None  # the head carries an adapter
    task = causal_task(tiny_llama, True)
    outputs = task.forward(wrapped, batch_of(model.config.vocab_size))
    assert not isinstance(outputs, HiddenOutputs)  # the model's own logits
