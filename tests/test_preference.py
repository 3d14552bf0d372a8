"""task.type preference: pairs and their tokens, the reference rules, metrics, resume, bad input.

A tiny random Llama with a ChatML template (``chat_fixtures``); the losses
themselves are compared with TRL in ``test_preference_trl.py``.
"""

from __future__ import annotations

import copy
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from chat_fixtures import build_tiny_llama, write_jsonl
from tunesmith.api import train
from tunesmith.config.root import Config
from tunesmith.data.batching import Collator
from tunesmith.errors import ConfigError, DataError
from tunesmith.evaluation.report.page import render_report
from tunesmith.models.loading import load_tokenizer
from tunesmith.tasks.base import get_task
from tunesmith.tasks.preference_batch import stack_pairs
from tunesmith.tasks.reference import Reference
from tunesmith.tasks.sequence_scores import score_tokens
from tunesmith.training.monitor import read_metrics

CHOSEN, REJECTED = "I am a tiny bot.", "hello world the quick brown fox"
LORA = {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def pairs(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Distinct questions, each with the same chosen and rejected reply."""
    rng = random.Random(seed)
    questions = ["What is your name?", "Where do you live?", "How old are you?", "Tell me a joke."]
    return [
        {"prompt": f"{rng.choice(questions)} {i}", "chosen": CHOSEN, "rejected": REJECTED}
        for i in range(n)
    ]


def pref_config(
    model: Path, data_file: Path, out: Path, **sections: dict[str, Any]
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": {"name_or_path": str(model)},
        "task": {"type": "preference"},
        "preference": {"beta": 0.5},
        "data": {"train": str(data_file), "max_length": 64, "validation_fraction": 0.2},
        "method": dict(LORA),
        "optim": {"lr": 5e-3, "warmup_ratio": 0.0, "weight_decay": 0.0},
        "train": {"epochs": 2, "batch_size": 8, "output_dir": str(out), "log_steps": 1},
        "generate": {"max_new_tokens": 4},
    }
    for name, values in sections.items():
        if name == "method" and "name" in values:  # another method: its own keys only
            cfg[name] = {}
        cfg.setdefault(name, {}).update(values)
    return cfg


def encoded(model: Path, data: Path, **sections: dict[str, Any]) -> tuple[Any, Any, list[dict]]:
    cfg = Config.from_dict(pref_config(model, data, Path("unused"), **sections))
    task = get_task(cfg)
    tokenizer = load_tokenizer(str(model))
    records = task.load_records(str(data))
    return task, tokenizer, task.encode(records, tokenizer, None)


# -- data ----------------------------------------------------------------------------------
def test_pairs_share_the_prompt_tokens_and_only_replies_are_scored(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", pairs(4))
    _, tokenizer, features = encoded(tiny_llama, data)
    for f in features:
        start = f["prompt_length"]
        assert f["input_ids"][:start] == f["rejected_input_ids"][:start]
        assert tokenizer.decode(f["input_ids"][:start]).endswith("<|im_start|>assistant\n")
        assert tokenizer.decode(f["input_ids"][start:]).startswith(CHOSEN)
        assert tokenizer.decode(f["rejected_input_ids"][start:]).startswith(REJECTED)
    batch = Collator(tokenizer.pad_token_id, "left")(features)  # either padding side
    ids, _, replies = stack_pairs(batch, tokenizer.pad_token_id)
    texts = [tokenizer.decode(row[keep]) for row, keep in zip(ids, replies, strict=True)]
    assert texts == [CHOSEN + "<|im_end|>\n"] * 4 + [REJECTED + "<|im_end|>\n"] * 4
    assert (ids[:, 0] != tokenizer.pad_token_id).all()  # right-aligned: positions from 0


def test_bad_pairs_are_counted_and_a_set_without_any_is_refused(tiny_llama, tmp_path, caplog):
    rows = [
        *pairs(3),
        {"prompt": "Same? 1", "chosen": "yes", "rejected": "yes"},
        {"prompt": "Long? " + "word " * 80, "chosen": "a", "rejected": "b"},
    ]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level("WARNING"):
        _, _, features = encoded(tiny_llama, data)
    assert len(features) == 3
    assert "dropped 1 rows: chosen and rejected replies are identical" in caplog.text
    assert "dropped 1 rows: no reply token within data.max_length" in caplog.text
    bad = write_jsonl(tmp_path / "bad.jsonl", rows[3:])
    no_split = {"validation": str(bad)}
    cfg = Config.from_dict(pref_config(tiny_llama, bad, tmp_path / "run", data=no_split))
    with pytest.raises(DataError, match="no usable preference row: all 2 rows were dropped"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # refused before the model loaded or a folder
    missing = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match="rejected"):
        encoded(tiny_llama, missing)


def test_kto_labels_must_be_boolean(tiny_llama, tmp_path):
    rows = [{"prompt": "q 1", "completion": "a", "label": "maybe"}]
    data = write_jsonl(tmp_path / "k.jsonl", rows)
    with pytest.raises(DataError, match="must be true or false"):
        encoded(tiny_llama, data, preference={"loss": "kto"}, train={"batch_size": 2})


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"preference": {"loss": "dpo", "simpo_gamma": 0.3}}, "simpo_gamma: not read by"),
        ({"preference": {"loss": "orpo", "precompute_reference": True}}, "not read by"),
        ({"task": {"label_smoothing": 0.1}}, "does not use it; only robust"),
        ({"preference": {"loss": "kto"}, "data": {"format": "preference"}}, "reads kto rows"),
    ],
)
def test_keys_the_chosen_loss_ignores_are_errors(tiny_llama, tmp_path, section, match):
    with pytest.raises(ConfigError, match=match):
        Config.from_dict(pref_config(tiny_llama, tmp_path / "p.jsonl", tmp_path / "r", **section))


def test_preference_keys_on_another_task_are_errors(tiny_llama, tmp_path):
    cfg = pref_config(tiny_llama, tmp_path / "p.jsonl", tmp_path / "r", task={"type": "causal_lm"})
    with pytest.raises(ConfigError, match=r"preference\.beta: only read with task\.type"):
        Config.from_dict(cfg)


# -- the reference -------------------------------------------------------------------------
def reply_sums(model, batch, pad: int) -> torch.Tensor:
    ids, mask, replies = stack_pairs(batch, pad)
    with torch.no_grad():
        return score_tokens(model, ids, mask, replies).sums(replies[:, 1:])


def test_with_the_adapter_off_the_policy_is_the_base_exactly(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "p.jsonl", pairs(4))
    _, tokenizer, features = encoded(tiny_llama, data)
    batch = Collator(tokenizer.pad_token_id, "right")(features)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    expected = reply_sums(base, batch, tokenizer.pad_token_id)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = get_peft_model(copy.deepcopy(base), lora).eval()
    assert not torch.equal(reply_sums(policy, batch, tokenizer.pad_token_id), expected)
    ids, mask, replies = stack_pairs(batch, tokenizer.pad_token_id)
    ref = Reference("adapter_off").scores(policy, batch, ids, mask, replies)
    assert torch.equal(ref.sums(replies[:, 1:]), expected)


def test_precomputed_reference_equals_the_live_one(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", pairs(6))
    task, tokenizer, features = encoded(tiny_llama, data, method={"name": "full"})
    model = task.build_model([], tokenizer)
    live = task.reference  # a frozen copy for full fine-tuning
    assert live is not None and live.kind == "copy"
    batch = Collator(tokenizer.pad_token_id, "right")(features)
    ids, mask, replies = stack_pairs(batch, tokenizer.pad_token_id)
    expected = live.scores(model, batch, ids, mask, replies).sums(replies[:, 1:])
    pending = Reference("pending")
    dataset = type("Set", (), {"features": features})()
    task.tokenizer = tokenizer
    done = pending.precompute(model, [dataset], task, batch_size=4)
    batch = Collator(tokenizer.pad_token_id, "right")(features)
    chosen, rejected = done.scores(model, batch, ids, mask, replies)
    n = len(features)
    torch.testing.assert_close(chosen, expected[:n], rtol=0, atol=1e-5)
    torch.testing.assert_close(rejected, expected[n:], rtol=0, atol=1e-5)


def test_starting_from_an_sft_adapter_the_reference_is_the_sft_model(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    chats = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": f"q {i}", "response": CHOSEN} for i in range(24)]
    )
    sft = {
        "model": {"name_or_path": str(tiny_llama)},
        "task": {"type": "causal_lm"},
        "data": {"train": str(chats), "max_length": 64, "validation_fraction": 0.2},
        "method": dict(LORA),
        "optim": {"lr": 5e-2},
        "train": {"epochs": 2, "batch_size": 8, "output_dir": str(tmp_path / "sft")},
    }
    sft_dir = train(Config.from_dict(sft), progress=False, test=False).best_dir
    data = write_jsonl(tmp_path / "p.jsonl", pairs(4))
    cfg = pref_config(sft_dir, data, tmp_path / "dpo")
    task = get_task(Config.from_dict(cfg))
    tokenizer = load_tokenizer(str(sft_dir))
    features = task.encode(task.load_records(str(data)), tokenizer, None)
    start = task.build_model([], tokenizer)
    batch = Collator(tokenizer.pad_token_id, "right")(features)
    sft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), str(sft_dir)
    ).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    expected = reply_sums(sft_model, batch, tokenizer.pad_token_id)
    assert not torch.allclose(expected, reply_sums(base, batch, tokenizer.pad_token_id))
    torch.testing.assert_close(
        reply_sums(start.eval(), batch, tokenizer.pad_token_id), expected, rtol=0, atol=1e-5
    )
    assert task.reference is not None and task.reference.kind == "adapter_off"


# -- training --------------------------------------------------------------------------------
def test_dpo_learns_the_preference_and_logs_rewards(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", pairs(48))
    cfg = pref_config(tiny_llama, data, tmp_path / "run", train={"eval_at_start": True})
    result = train(Config.from_dict(cfg), progress=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    val = [r for r in records if r["split"] == "validation"]
    assert val[0]["reward_accuracy"] == 0.0 and val[0]["kl"] == 0.0  # untrained: policy = ref
    assert val[-1]["reward_accuracy"] == 1.0 and val[-1]["reward_margin"] > 0.5
    assert 0 < val[-1]["kl"] < 1.0
    trains = [r for r in records if r["split"] == "train"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "logps/ref_chosen"):
        assert key in trains[-1]
    assert trains[-1]["rewards/margin"] > trains[0]["rewards/margin"]
    assert result.best_dir is not None
    page = render_report(tmp_path / "run")
    assert (page.parent / "plots" / "rewards.png").is_file()
    assert "Preference rewards" in page.read_text()


@pytest.mark.parametrize(
    ("loss", "method"), [("kto", {"name": "full"}), ("simpo", LORA), ("dpo", {"name": "full"})]
)
def test_other_losses_and_methods_train(tiny_llama, tmp_path, loss, method):
    rows = kto_rows(24) if loss == "kto" else pairs(48)
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    extra = {"precompute_reference": True} if loss == "dpo" else {}
    cfg = pref_config(
        tiny_llama,
        data,
        tmp_path / "run",
        method=method,
        preference={"loss": loss, **extra},
        optim={"lr": 2e-3 if method["name"] == "full" else 5e-3},
    )
    train(Config.from_dict(cfg), progress=False)
    val = [
        r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "validation"
    ]
    assert val[-1]["reward_accuracy"] >= 0.9, val[-1]


def test_resume_ends_bit_identical(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", pairs(40))
    save = {"save_steps": 1, "save_minutes": None, "save_total_limit": 100}
    ref_dir, resumed_dir = tmp_path / "ref", tmp_path / "resumed"
    cfg = pref_config(tiny_llama, data, ref_dir, train=save, method={"dropout": 0.1})
    train(Config.from_dict(cfg), progress=False, test=False)
    shutil.copytree(ref_dir, resumed_dir)
    for folder in ("final", "best"):
        shutil.rmtree(resumed_dir / folder)
    checkpoints = sorted((resumed_dir / "checkpoints").iterdir())
    for later in checkpoints[3:]:
        shutil.rmtree(later)
    resumed_cfg = copy.deepcopy(cfg)
    resumed_cfg["train"]["output_dir"] = str(resumed_dir)
    train(Config.from_dict(resumed_cfg), progress=False, test=False, resume=checkpoints[2])
    for folder in ("final", "best"):
        a = load_file(str(resumed_dir / folder / "adapter_model.safetensors"))
        b = load_file(str(ref_dir / folder / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [read_metrics(d / "metrics.jsonl") for d in (resumed_dir, ref_dir)]
    timing = ("time", "tokens_per_s", "rss_mb")
    kept = [[{k: v for k, v in r.items() if k not in timing} for r in log] for log in logs]
    assert kept[0] == kept[1] and any(r["split"] == "validation" for r in kept[0])


def kto_rows(n: int) -> list[dict[str, Any]]:
    return [
        {"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
        for r in pairs(n)
        for side in ("chosen", "rejected")
    ]


def test_precomputed_kto_reference_equals_the_live_one(tiny_llama, tmp_path):
    """KTO stores two sums per row: its own completion's and the mismatched one's."""
    from tunesmith.tasks.preference_batch import kto_batch, mismatched_batch

    data = write_jsonl(tmp_path / "k.jsonl", kto_rows(3))
    sections = {"method": {"name": "full"}, "preference": {"loss": "kto"}, "train": {}}
    task, tokenizer, features = encoded(tiny_llama, data, **sections)
    model = task.build_model([], tokenizer)
    batch = Collator(tokenizer.pad_token_id, "right")(features)
    pad = tokenizer.pad_token_id
    live = [task.reference.scores(model, batch, *kto_batch(batch, pad)).sums()]
    live.append(task.reference.scores(model, batch, *mismatched_batch(batch, pad)).sums())
    task.tokenizer = tokenizer
    dataset = type("Set", (), {"features": features})()
    done = Reference("pending").precompute(model, [dataset], task, batch_size=4)
    batch = Collator(tokenizer.pad_token_id, "right")(features)
    own = done.scores(model, batch, *kto_batch(batch, pad))
    other = done.scores(model, batch, *mismatched_batch(batch, pad), kl=True)
    torch.testing.assert_close(own, live[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(other, live[1], rtol=0, atol=1e-5)
    assert not torch.allclose(own, other)


def test_accumulation_equals_one_large_batch(tiny_llama, tmp_path):
    """The loss of a batch is the sum of its pairs' losses, gradients included.

    The loop divides a window's summed losses by its pairs, so micro-batches of
    4 + 2 pairs then give exactly the step one batch of 6 gives; a mean per
    micro-batch would weigh the two micro-batches' pairs differently.
    """
    data = write_jsonl(tmp_path / "p.jsonl", pairs(6))
    task, tokenizer, features = encoded(tiny_llama, data, method={"name": "full"})
    model = task.build_model([], tokenizer)
    collate = Collator(tokenizer.pad_token_id, "right")

    def loss_and_grads(*chunks: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        total = sum(task.loss_sum(task.forward(model, collate(c)), collate(c)) for c in chunks)
        (total / len(features)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return float(total), grads

    whole, g_whole = loss_and_grads(features)
    parts, g_parts = loss_and_grads(features[:4], features[4:])
    assert parts == pytest.approx(whole, rel=1e-6)
    assert g_whole.keys() == g_parts.keys() and g_whole
    for name, grad in g_whole.items():
        torch.testing.assert_close(g_parts[name], grad, atol=1e-7, rtol=1e-5, msg=name)
