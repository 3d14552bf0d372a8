"""Gradient accumulation: k micro-batches must equal one batch k times larger.

Adam's first step is invariant to a constant gradient scale, so comparing
weights alone would miss a wrongly normalised loss; the gradients themselves
are compared first, then the weights after a real optimizer step.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import tiny_config, toy_rows, write_csv
from helpers import make_trainer
from tunesmith.config.root import Config
from tunesmith.data.batching import Collator
from tunesmith.models.loading import load_tokenizer
from tunesmith.tasks.base import get_task
from tunesmith.training.loop import StepStats, Trainer


def _trainer(cfg: Config, model: torch.nn.Module, features: list, tmp: Path):
    return make_trainer(cfg, features, tmp, model=model)[0]


@pytest.fixture
def setup(tiny_bert: Path, tmp_path: Path):
    data = write_csv(tmp_path / "d.csv", toy_rows(64, seed=3))
    base = tiny_config(tiny_bert, data, tmp_path / "run", optim={"lr": 1e-3, "max_grad_norm": None})
    cfg = Config.from_dict(base)
    task = get_task(cfg)
    tok = load_tokenizer(str(tiny_bert))
    records = task.load_records(str(data))[:32]
    features = task.encode(records, tok, {"neg": 0, "pos": 1})
    torch.manual_seed(0)
    model = task.build_model(["neg", "pos"], tok)
    return base, features, Collator(tok.pad_token_id), model


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(trainer: Trainer, window: list) -> tuple[StepStats, dict[str, torch.Tensor]]:
    """One optimizer step; its sums and the gradients as the optimizer received them."""
    grads: dict[str, torch.Tensor] = {}
    inner = trainer.optimizer.optimizer
    original = inner.step

    def step(*args, **kwargs):
        grads.update(_grads(trainer.model))
        return original(*args, **kwargs)

    inner.step = step
    return trainer.train_step(window), grads


@pytest.mark.parametrize("masked", [False, True], ids=["all-targets", "uneven-targets"])
def test_four_micro_batches_of_8_equal_one_batch_of_32(setup, tmp_path, masked):
    base, features, collator, model = setup
    features = copy.deepcopy(features)
    if masked:
        # Ignored targets spread unevenly: a per-micro-batch mean would now
        # weight the examples differently from one big batch.
        for i in (0, 1, 2, 9, 30):
            features[i]["labels"] = -100
    big = Config.from_dict({**base, "train": {**base["train"], "batch_size": 32, "grad_accum": 1}})
    small = Config.from_dict({**base, "train": {**base["train"], "batch_size": 8, "grad_accum": 4}})
    t_big = _trainer(big, copy.deepcopy(model), features, tmp_path)
    t_small = _trainer(small, copy.deepcopy(model), features, tmp_path)

    big_stats, g_big = _step(t_big, [collator(features)])
    small_stats, g_small = _step(t_small, [collator(features[i : i + 8]) for i in (0, 8, 16, 24)])

    assert big_stats.targets == small_stats.targets == (27 if masked else 32)
    assert small_stats.loss_sum == pytest.approx(big_stats.loss_sum, rel=1e-5)
    assert g_big.keys() == g_small.keys() and len(g_big) > 10
    for name in g_big:
        torch.testing.assert_close(g_small[name], g_big[name], atol=1e-6, rtol=1e-5, msg=name)

    # Both steps were taken: the weights after them must agree too.
    before = dict(model.named_parameters())
    changed = 0
    for (name, p_big), (_, p_small) in zip(
        t_big.model.named_parameters(), t_small.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p_small, p_big, atol=1e-6, rtol=0, msg=name)
        changed += int(not torch.equal(p_big, before[name]))
    assert changed > 10  # the step really moved the weights


def test_per_micro_batch_mean_would_differ(setup, tmp_path):
    """Guard for the test above: the buggy normalisation gives different gradients."""
    base, features, collator, model = setup
    features = copy.deepcopy(features)
    for i in (0, 1, 2, 9, 30):
        features[i]["labels"] = -100
    cfg = Config.from_dict({**base, "train": {**base["train"], "batch_size": 32}})
    reference = _trainer(cfg, copy.deepcopy(model), features, tmp_path)
    _, ref_grads = _step(reference, [collator(features)])
    buggy = copy.deepcopy(model)
    task = get_task(cfg)
    for i in (0, 8, 16, 24):
        batch = collator(features[i : i + 8])
        out = buggy(**task.model_inputs(batch))
        (task.loss_sum(out, batch) / task.count_targets(batch) / 4).backward()
    diffs = [(g - ref_grads[name]).abs().max().item() for name, g in _grads(buggy).items()]
    assert max(diffs) > 1e-4
