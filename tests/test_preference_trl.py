"""TRL as the oracle: our preference losses and their gradients equal TRL 1.16's.

A tiny random Llama (the policy) and a perturbed copy of it (the reference),
a fixed batch of two chat pairs, fp32. For DPO's family and KTO, TRL tokenises
the rows itself and the test first checks that our features hold exactly its
tokens; ORPO and SimPO (TRL's experimental ``ORPOTrainer`` and ``CPOTrainer``)
get our tokens in their legacy batch layout. Then both losses, and every
parameter's gradient, agree within 1e-5.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from chat_fixtures import build_tiny_llama
from tunesmith.config.root import Config
from tunesmith.data.batching import Collator
from tunesmith.tasks.base import get_task
from tunesmith.tasks.reference import Reference

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore")

PAIRS = [
    ("What is your name? 5", "I am a tiny bot.", "hello world the quick"),
    ("Tell me a joke.", "Knock knock.", "the lazy dog 0123"),
    ("Where do you live? 7", "I live in a test.", "brown fox"),
    ("How old are you?", "I was built today.", "jumps over"),
]
KTO_ROWS = [(p, c, True) for p, c, _ in PAIRS[:2]] + [(p, r, False) for p, _, r in PAIRS[2:]]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def reply(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any, Any]:
    """The model folder, its tokenizer, the policy and a reference that differs from it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_llama(tmp_path_factory.mktemp("llama"))
    policy = AutoModelForCausalLM.from_pretrained(folder)
    reference = copy.deepcopy(policy)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return folder, AutoTokenizer.from_pretrained(folder), policy, reference


def our_loss(
    folder: Path, tokenizer, policy, reference, loss: str, records: list[dict], **preference
) -> tuple[torch.Tensor, list[dict]]:
    """Our mean loss over ``records`` (one batch) with ``reference`` as a frozen copy."""
    label_smoothing = preference.pop("label_smoothing", 0.0)
    cfg = Config.from_dict(
        {
            "model": {"name_or_path": str(folder)},
            "task": {"type": "preference", "label_smoothing": label_smoothing},
            "preference": {"loss": loss, **preference},
            "data": {"train": "unused.jsonl", "max_length": 128},
            "method": {"name": "full"},
            "train": {"batch_size": len(records)},
        }
    )
    task = get_task(cfg)
    features = task.encode(records, tokenizer, None)
    if cfg.preference.needs_reference:
        task.reference = Reference("copy", reference)
    batch = Collator(tokenizer.pad_token_id, "right")(features)
    policy.train()
    out = task.forward(policy, batch)
    return task.loss_sum(out, batch) / task.count_targets(batch), features


def grads_after(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(ours: torch.Tensor, theirs: torch.Tensor, g_ours: dict, g_theirs: dict) -> None:
    assert float(ours) == pytest.approx(float(theirs), abs=1e-5)
    assert float(ours) != 0.0
    assert g_ours.keys() == g_theirs.keys() and g_ours
    for name, grad in g_ours.items():
        torch.testing.assert_close(grad, g_theirs[name], atol=1e-5, rtol=1e-4, msg=name)


def trl_run(trainer_cls, args, rows: list[dict], models) -> tuple[Any, torch.Tensor, dict]:
    """TRL's trainer on ``rows`` (one batch): its tokenised rows, its loss and its gradients."""
    from datasets import Dataset

    _, tokenizer, policy, reference = models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(
            model=copy.deepcopy(policy),
            ref_model=copy.deepcopy(reference),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    data = trainer.train_dataset
    batch = trainer.data_collator([data[i] for i in range(len(rows))])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    return data, loss, grads_after(trainer.model, loss)


def pair_records() -> list[dict]:
    return [
        {"prompt": user(p), "chosen": reply(c), "rejected": reply(r), "source": f"row {i}"}
        for i, (p, c, r) in enumerate(PAIRS)
    ]


def trl_args(cls, **kwargs):
    return cls(
        output_dir="unused",
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=len(PAIRS),
        **kwargs,
    )


@pytest.mark.parametrize(
    ("loss", "trl_loss", "extra"),
    [
        ("dpo", "sigmoid", {}),
        ("ipo", "ipo", {}),
        ("hinge", "hinge", {}),
        ("robust", "robust", {"label_smoothing": 0.2}),
    ],
)
def test_dpo_family_equals_trl_dpo_trainer(models, tmp_path, loss, trl_loss, extra):
    from trl import DPOConfig, DPOTrainer

    folder, tokenizer, policy, reference = models
    beta = 0.3
    rows = [{"prompt": user(p), "chosen": reply(c), "rejected": reply(r)} for p, c, r in PAIRS]
    args = trl_args(DPOConfig, loss_type=[trl_loss], beta=beta, max_length=None, **extra)
    data, theirs, g_theirs = trl_run(DPOTrainer, args, rows, models)

    mine = copy.deepcopy(policy)
    ours, features = our_loss(
        folder, tokenizer, mine, reference, loss, pair_records(), beta=beta, **extra
    )
    for feature, row in zip(features, data, strict=True):  # TRL's own tokens, exactly
        start = feature["prompt_length"]
        assert feature["input_ids"][:start] == row["prompt_ids"]
        assert feature["input_ids"][start:] == row["chosen_ids"]
        assert feature["rejected_input_ids"][start:] == row["rejected_ids"]
    assert_same(ours, theirs, grads_after(mine, ours), g_theirs)


def legacy_batch(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Our tokens in the batch layout of TRL's ORPO/CPO trainers (prompt labels -100)."""

    def padded(rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(map(len, rows))
        return torch.tensor([r + [value] * (width - len(r)) for r in rows])

    batch: dict[str, torch.Tensor] = {}
    for side, key in (("chosen", "input_ids"), ("rejected", "rejected_input_ids")):
        ids = [f[key] for f in features]
        labels = [
            [-100] * f["prompt_length"] + s[f["prompt_length"] :]
            for f, s in zip(features, ids, strict=True)
        ]
        batch[f"{side}_input_ids"] = padded(ids, pad_id)
        batch[f"{side}_attention_mask"] = padded([[1] * len(s) for s in ids], 0)
        batch[f"{side}_labels"] = padded(labels, -100)
    return batch


@pytest.mark.parametrize("loss", ["orpo", "simpo"])
def test_reference_free_losses_equal_trl_experimental_trainers(models, loss):
    from datasets import Dataset

    folder, tokenizer, policy, reference = models
    beta = 0.25
    if loss == "orpo":
        from trl.experimental.orpo import ORPOConfig as Cfg
        from trl.experimental.orpo import ORPOTrainer as Trainer

        args = trl_args(Cfg, beta=beta, max_length=128)
        ours_extra: dict = {}
    else:
        from trl.experimental.cpo import CPOConfig as Cfg
        from trl.experimental.cpo import CPOTrainer as Trainer

        args = trl_args(
            Cfg, beta=beta, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.4, max_length=128
        )
        ours_extra = {"simpo_gamma": 0.4}
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(
            model=copy.deepcopy(policy),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    mine = copy.deepcopy(policy)
    ours, features = our_loss(
        folder, tokenizer, mine, reference, loss, pair_records(), beta=beta, **ours_extra
    )
    trainer.model.train()
    theirs, _ = trainer.get_batch_loss_metrics(
        trainer.model, legacy_batch(features, tokenizer.pad_token_id)
    )
    assert_same(ours, theirs, grads_after(mine, ours), grads_after(trainer.model, theirs))


def test_kto_equals_trl_kto_trainer(models):
    from trl import KTOConfig, KTOTrainer

    folder, tokenizer, policy, reference = models
    beta, weights = 0.2, {"desirable_weight": 1.3, "undesirable_weight": 0.7}
    rows = [{"prompt": user(p), "completion": reply(c), "label": d} for p, c, d in KTO_ROWS]
    args = trl_args(KTOConfig, beta=beta, max_length=None, **weights)
    data, theirs, g_theirs = trl_run(KTOTrainer, args, rows, models)
    records = [
        {"prompt": user(p), "completion": reply(c), "desirable": d, "source": f"row {i}"}
        for i, (p, c, d) in enumerate(KTO_ROWS)
    ]
    mine = copy.deepcopy(policy)
    ours, features = our_loss(
        folder, tokenizer, mine, reference, "kto", records, beta=beta, **weights
    )
    for feature, row in zip(features, data, strict=True):
        start = feature["prompt_length"]
        assert feature["input_ids"][:start] == row["prompt_ids"]
        assert feature["input_ids"][start:] == row["completion_ids"]
    assert_same(ours, theirs, grads_after(mine, ours), g_theirs)
