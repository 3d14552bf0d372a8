"""Online RL (``task.type: rl``): advantages, rollouts, rewards, guards and exact resume.

A tiny random Llama with a ChatML template (``chat_fixtures``) answers
addition prompts; the losses themselves are checked against TRL in
``test_rl_trl.py``. Here: what the loop and the task around them must get
right (each test fails when its feature breaks).
"""

from __future__ import annotations

import copy
import html
import json
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from chat_fixtures import build_tiny_llama, write_jsonl
from tunesmith.api import train
from tunesmith.config.root import Config
from tunesmith.errors import ConfigError, TrainingDiverged
from tunesmith.evaluation.report.page import render_report
from tunesmith.methods.base import get_method
from tunesmith.models.loading import load_tokenizer
from tunesmith.runs.rewards import rl_rewards
from tunesmith.tasks.base import get_task
from tunesmith.tasks.losses.rl import grpo_advantages, rloo_advantages
from tunesmith.tasks.rl_rewards import Scored
from tunesmith.training.monitor import read_metrics

LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def sums(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Addition prompts with their answers."""
    rng = random.Random(seed)
    pairs = [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(n)]
    return [{"prompt": f"What is {a} plus {b}?", "answer": str(a + b)} for a, b in pairs]


def rl_config(model: Path, data: Path, out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": {"name_or_path": str(model)},
        "task": {"type": "rl"},
        "rl": {
            "rewards": [{"type": "answer", "pattern": r"(\d+)"}, {"type": "length", "weight": 0.5}],
            "group_size": 4,
            "max_new_tokens": 6,
            "beta": 0.05,
        },
        "data": {"train": str(data), "max_length": 64, "validation_fraction": 0.2},
        "method": dict(LORA),
        "optim": {"lr": 5e-3, "warmup_ratio": 0.0, "weight_decay": 0.0},
        "train": {"epochs": 1, "batch_size": 4, "output_dir": str(out), "log_steps": 1},
    }
    for name, values in sections.items():
        if name == "method" and "name" in values:
            cfg[name] = {}
        cfg.setdefault(name, {}).update(values)
    return cfg


def ready_task(model: Path, data: Path, **sections: dict[str, Any]) -> tuple[Any, Any, list]:
    """The task with rewards, the adapted model and the encoded training rows."""
    cfg = Config.from_dict(rl_config(model, data, Path("unused"), **sections))
    task = get_task(cfg)
    task.rewards = rl_rewards(cfg.rl)
    tokenizer = load_tokenizer(str(model))
    features = task.encode(task.load_records(str(data)), tokenizer, None)
    adapted = get_method(cfg).apply(task.build_model([], tokenizer))
    task.before_training(adapted, (), 4)
    return task, adapted, features


# -- advantages -------------------------------------------------------------------------
def test_group_advantages_have_zero_mean_per_group_and_equal_rewards_give_none():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.3, 0.3, 0.3, 0.3])
    for scale in ("group", "batch", "none"):
        adv = grpo_advantages(rewards, 4, scale).view(-1, 4)
        torch.testing.assert_close(adv.mean(1), torch.zeros(2), atol=1e-6, rtol=0)
        assert torch.equal(adv[1], torch.zeros(4))
    loo = rloo_advantages(rewards, 4, normalize=False).view(-1, 4)
    assert torch.equal(loo[1], torch.zeros(4)) and loo[0, 0] > 0 > loo[0, 1]


def test_a_group_with_equal_rewards_contributes_no_gradient(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", sums(4))
    task, model, features = ready_task(tiny_llama, data, rl={"beta": 0.0})
    window = [_collate(task, features[:2])]
    batches = task.rollout(model, window)
    batch = batches[0]
    g = task.settings.group_size
    # Rewards 1 for every completion of the first prompt (equal), varied for the second.
    rewards = torch.tensor([1.0] * g + [float(i) for i in range(g)])
    batch["advantages"] = task._advantages(rewards, batches)
    first = {k: v[:g] if v.dim() and v.shape[0] == 2 * g else v for k, v in batch.items()}
    model.train()
    loss = task.loss_sum(task.forward(model, first), first)
    model.zero_grad(set_to_none=True)
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in trained)
    second = {k: v[g:] if v.dim() and v.shape[0] == 2 * g else v for k, v in batch.items()}
    task.loss_sum(task.forward(model, second), second).backward()
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in trained)


def _collate(task: Any, features: list[dict]) -> dict[str, torch.Tensor]:
    from tunesmith.data.batching import Collator

    return Collator(task.tokenizer.pad_token_id, "right")(features)


# -- rollouts ---------------------------------------------------------------------------------
def test_first_update_ratio_from_stored_log_probs_is_one(tiny_llama, tmp_path):
    """Stored at rollout time by a separate forward, under LoRA with dropout configured."""
    data = write_jsonl(tmp_path / "p.jsonl", sums(8))
    task, model, features = ready_task(tiny_llama, data, rl={"iterations": 2})
    window = [_collate(task, features[:3]), _collate(task, features[3:5])]
    batches = task.rollout(model, window)
    assert [len(b["input_ids"]) for b in batches] == [12, 8]
    model.train()
    for batch in batches:
        assert "old_logps" in batch
        out = task.forward(model, batch)
        ratio = torch.exp(out.logps - batch["old_logps"])[out.mask]
        assert out.mask.any()
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-6, rtol=0)
        # only completion tokens are scored, every one of them
        assert torch.equal(out.mask, batch["completion"][:, 1:])


def test_rollouts_are_sampled_from_the_run_generator(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", sums(4))
    task, model, features = ready_task(tiny_llama, data)
    window = [_collate(task, features[:2])]
    state = task.rng.get_state()
    a = task.rollout(model, window)[0]["input_ids"]
    task.rng.set_state(state)
    b = task.rollout(model, window)[0]["input_ids"]
    c = task.rollout(model, window)[0]["input_ids"]
    assert torch.equal(a, b) and not torch.equal(b, c)
    rows = a.view(2, task.settings.group_size, -1)
    assert any(not torch.equal(rows[0, 0], rows[0, i]) for i in range(1, 4))  # a real group


# -- rewards ----------------------------------------------------------------------------------
def test_built_in_rewards(tiny_llama):
    cfg = Config.from_dict(
        rl_config(
            tiny_llama,
            Path("x.jsonl"),
            Path("unused"),
            rl={
                "rewards": [
                    {"type": "answer", "pattern": r"answer: (-?\d+)", "weight": 2.0},
                    {"type": "answer", "name": "exact"},
                    {"type": "length", "weight": 0.5},
                ]
            },
        )
    )
    rewards = rl_rewards(cfg.rl)
    scored = Scored(
        prompts=["p"] * 3,
        completions=["so answer: 12.", " 7 ", "answer: 3"],
        lengths=[6, 0, 3],
        columns=[{"answer": "12"}, {"answer": 7}, {"answer": "4"}],
    )
    total, parts = rewards(scored)
    assert parts["answer"].tolist() == [1.0, 0.0, 0.0]
    assert parts["exact"].tolist() == [0.0, 1.0, 0.0]
    assert parts["length"].tolist() == [-1.0, 0.0, -0.5]
    torch.testing.assert_close(total, torch.tensor([1.5, 1.0, -0.25]))


def test_custom_reward_needs_the_opt_in(tiny_llama, tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def shout(prompts, completions, answer, **kw):\n"
        "    return [float(c.isupper()) + 0 * len(a) for c, a in zip(completions, answer)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    custom = {"rewards": [{"type": "custom", "function": "my_rewards:shout"}]}
    with pytest.raises(ConfigError, match="allow_custom_reward"):
        Config.from_dict(rl_config(tiny_llama, Path("x.jsonl"), tmp_path, rl=custom))
    cfg = Config.from_dict(
        rl_config(tiny_llama, Path("x.jsonl"), tmp_path, rl={**custom, "allow_custom_reward": True})
    )
    total, _ = rl_rewards(cfg.rl)(Scored(["p", "q"], ["HI", "hi"], [1, 1], [{"answer": "1"}] * 2))
    assert total.tolist() == [1.0, 0.0]
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize(
    ("rl", "match"),
    [
        ({"temperature": 0.0}, "must be sampled"),
        ({"rewards": []}, "at least one reward"),
        ({"loss_type": "grpo", "algorithm": "rloo"}, "rl.loss_type: not read by rl.algorithm rloo"),
        ({"rewards": [{"type": "answer", "pattern": "(("}]}, "not a regular expression"),
    ],
)
def test_bad_rl_settings_are_refused(tiny_llama, tmp_path, rl, match):
    with pytest.raises(ConfigError, match=match):
        Config.from_dict(rl_config(tiny_llama, Path("x.jsonl"), tmp_path, rl=rl))


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prompt_learning_cannot_roll_out(tiny_llama, tmp_path, method):
    cfg = rl_config(tiny_llama, Path("x.jsonl"), tmp_path, method={"name": method})
    with pytest.raises(ConfigError, match="virtual tokens"):
        Config.from_dict(cfg)


def test_rl_keys_on_another_task_are_errors(tiny_llama, tmp_path):
    cfg = rl_config(tiny_llama, Path("x.jsonl"), tmp_path, task={"type": "causal_lm"})
    with pytest.raises(ConfigError, match=r"only read with task\.type rl"):
        Config.from_dict(cfg)


def test_classifier_reward_reads_a_saved_classifier(tmp_path):
    from conftest import build_tiny_bert
    from helpers import tiny_config, toy_rows, write_csv

    model = build_tiny_bert(tmp_path / "bert")
    data = write_csv(tmp_path / "train.csv", toy_rows(40))
    clf_cfg = Config.from_dict(tiny_config(model, data, tmp_path / "clf"))
    clf = train(clf_cfg, progress=False, test=False).best_dir
    labels = json.loads((Path(clf) / "tunesmith.json").read_text())["labels"]
    cfg = Config.from_dict(
        rl_config(
            tmp_path,
            Path("x.jsonl"),
            tmp_path / "run",
            rl={"rewards": [{"type": "classifier", "path": str(clf), "label": labels[0]}]},
        )
    )
    texts = ["the film was superb", "a dull boring story", "it was fine"]
    total, _ = rl_rewards(cfg.rl)(Scored(["p"] * 3, texts, [1] * 3, [{}] * 3))
    from tunesmith.api import predict

    probs = [row["probabilities"][labels[0]] for row in predict(clf, texts=texts)]
    torch.testing.assert_close(total, torch.tensor(probs), atol=1e-5, rtol=0)
    both = {"type": "classifier", "path": str(clf), "label": labels[0]}
    both["text"] = "prompt_and_completion"
    cfg = Config.from_dict(rl_config(tmp_path, Path("x"), tmp_path, rl={"rewards": [both]}))
    total, _ = rl_rewards(cfg.rl)(Scored(["the film"] * 2, texts[:2], [1] * 2, [{}] * 2))
    probs = [
        r["probabilities"][labels[0]]
        for r in predict(clf, texts=[f"the film {t}" for t in texts[:2]])
    ]
    torch.testing.assert_close(total, torch.tensor(probs), atol=1e-5, rtol=0)
    bad = {"rewards": [{"type": "classifier", "path": str(clf), "label": "nope"}]}
    with pytest.raises(ConfigError, match="no label 'nope'"):
        rl_rewards(Config.from_dict(rl_config(tmp_path, Path("x"), tmp_path, rl=bad)).rl)


# -- the run ----------------------------------------------------------------------------------
def test_a_run_logs_rewards_writes_samples_and_reports_them(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", sums(24))
    out = tmp_path / "run"
    cfg = rl_config(tiny_llama, data, out, rl={"eval_samples": 3}, train={"eval_steps": 2})
    result = train(Config.from_dict(cfg), progress=False)
    records = read_metrics(out / "metrics.jsonl")
    trained = [r for r in records if r["split"] == "train" and "reward" in r]
    assert trained and all(
        k in trained[0]
        for k in ("reward", "reward_std", "completion_length", "generated_tokens_per_s")
    )
    assert any("kl" in r and "clip_fraction" in r for r in records if r["split"] == "train")
    val = [r for r in records if r["split"] == "validation"]
    assert val and {"reward", "kl", "completion_length", "reward/answer"} <= set(val[-1])
    samples = sorted((out / "samples").iterdir())
    assert len(samples) == len(val)
    rows = [json.loads(line) for line in samples[-1].read_text().splitlines()]
    assert len(rows) == 3 and {"prompt", "completion", "reward", "answer"} <= set(rows[0])
    assert result.best_dir is not None
    page = render_report(out).read_text()
    assert "Samples of the last evaluation" in page and "rl.png" in page
    assert html.escape(rows[0]["prompt"]) in page


def test_guard_stops_the_run_past_the_kl_limit(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", sums(24))
    cfg = rl_config(tiny_llama, data, tmp_path / "run", rl={"max_kl": 1e-9}, optim={"lr": 5e-2})
    with pytest.raises(TrainingDiverged, match=r"rl.max_kl"):
        train(Config.from_dict(cfg), progress=False)


@pytest.mark.parametrize("stop_at", [3, 4])
def test_resume_ends_bit_identical(tiny_llama, tmp_path, stop_at):
    """Killed after an odd step (between the two updates of one rollout batch) or an even one."""
    data = write_jsonl(tmp_path / "p.jsonl", sums(24))
    save = {"save_steps": 1, "save_minutes": None, "save_total_limit": 100, "eval_steps": 4}
    ref_dir, resumed_dir = tmp_path / "ref", tmp_path / "resumed"
    cfg = rl_config(tiny_llama, data, ref_dir, train=save, rl={"iterations": 2})
    train(Config.from_dict(cfg), progress=False, test=False)
    shutil.copytree(ref_dir, resumed_dir)
    for folder in ("final", "samples"):  # best/ stays: a later evaluation may not beat it
        shutil.rmtree(resumed_dir / folder)
    checkpoints = sorted((resumed_dir / "checkpoints").iterdir())
    assert len(checkpoints) > stop_at
    if stop_at % 2:
        assert (checkpoints[stop_at - 1] / "window.safetensors").is_file()
    for later in checkpoints[stop_at:]:
        shutil.rmtree(later)
    resumed_cfg = copy.deepcopy(cfg)
    resumed_cfg["train"]["output_dir"] = str(resumed_dir)
    train(
        Config.from_dict(resumed_cfg), progress=False, test=False, resume=checkpoints[stop_at - 1]
    )
    for folder in ("final", "best"):
        a = load_file(str(resumed_dir / folder / "adapter_model.safetensors"))
        b = load_file(str(ref_dir / folder / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    samples = [sorted(p.name for p in (d / "samples").iterdir()) for d in (resumed_dir, ref_dir)]
    assert samples[0] == [n for n in samples[1] if int(n[5:12]) > stop_at]
    logs = [read_metrics(d / "metrics.jsonl") for d in (resumed_dir, ref_dir)]
    timing = ("time", "tokens_per_s", "rss_mb", "generation_s", "generated_tokens_per_s")
    kept = [[{k: v for k, v in r.items() if k not in timing} for r in log] for log in logs]
    assert kept[0] == kept[1] and any(r["split"] == "validation" for r in kept[0])


def test_estimate_refuses_rl_and_says_what_to_do(tiny_llama, tmp_path):
    from tunesmith.inspect.estimate import estimate

    cfg = Config.from_dict(rl_config(tiny_llama, Path("x.jsonl"), tmp_path))
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        estimate(cfg)
