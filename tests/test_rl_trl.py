"""TRL as the oracle: our GRPO and RLOO losses and their gradients equal TRL 1.16's.

A tiny random Llama (the policy) and a perturbed copy (the reference), fp32,
two prompts with four fixed completions each (some end at EOS, some run to the
budget) and fixed rewards. TRL's own ``_generate_and_score_completions`` turns
them into its training inputs (its generation replaced by the fixed
completions, its reward function returning the fixed rewards), so advantages,
reference log-probabilities and normalisers are TRL's. The old log-probabilities
are then set to fixed values away from the policy's on both sides, so the
ratio is not 1 and clipping happens. Both losses, and every parameter's
gradient, agree within 1e-5 for each ``loss_type``, each ``scale_rewards``, with
and without the KL term, and for RLOO.
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
from tunesmith.tasks.base import get_task
from tunesmith.tasks.reference import Reference
from tunesmith.tasks.rl_rollout import completion_rows

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore")

G = 4
MAX_NEW = 6
TEMPERATURE = 0.7
PROMPTS = ["hello world the", "quick brown fox jumps over"]
#: Four completions per prompt (EOS is appended where a completion stopped).
COMPLETIONS = [
    ["the lazy", "dog", "hello hello world", "fox"],
    ["over the", "quick brown", "jumps", "the the the"],
]
STOPPED = [[True, True, False, True], [False, True, True, False]]
REWARDS = [1.0, 0.0, 0.5, 0.25, 0.2, 0.9, 0.0, 1.0]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """The model folder, its tokenizer and the policy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_llama(tmp_path_factory.mktemp("llama"))
    return (
        folder,
        AutoTokenizer.from_pretrained(folder),
        AutoModelForCausalLM.from_pretrained(folder),
    )


def fixed_rollouts(tokenizer: Any) -> tuple[list[list[int]], list[list[int]]]:
    """Each row's prompt ids and completion ids (group after group)."""
    prompts, completions = [], []
    for prompt, group, stops in zip(PROMPTS, COMPLETIONS, STOPPED, strict=True):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for text, stopped in zip(group, stops, strict=True):
            c = tokenizer(text, add_special_tokens=False)["input_ids"][: MAX_NEW - 1]
            # a stopped completion ends at EOS; the others ran to the budget
            c = [*c, tokenizer.eos_token_id] if stopped else (c * MAX_NEW)[:MAX_NEW]
            prompts.append(ids)
            completions.append(c)
    return prompts, completions


def perturbed(model: Any, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def trl_inputs(trainer: Any, tokenizer: Any, rloo: bool) -> dict[str, Any]:
    """TRL's training inputs for the fixed completions and rewards."""
    prompts, completions = fixed_rollouts(tokenizer)
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    if rloo:
        trainer._generate = lambda _: (prompts, completions, texts)
    else:
        trainer._generate = lambda _: (prompts, completions, None, texts, None, {}, None, None)
    inputs = [{"prompt": p} for p in PROMPTS for _ in range(G)]
    trainer.model.train()
    return trainer._generate_and_score_completions(inputs)


def fixed_old_logps(shape: tuple[int, ...], seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(shape, generator=gen)


def grads(model: Any, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run_both(models, rl: dict[str, Any]) -> tuple[float, float, dict, dict, float]:
    """(ours, TRL's) loss and gradients for the same fixed rollouts; and the clipped share."""
    folder, tokenizer, policy = models
    algorithm = rl.get("algorithm", "grpo")
    beta = rl.get("beta", 0.0 if algorithm == "grpo" else 0.05)
    common = {
        "output_dir": "unused",
        "per_device_train_batch_size": len(PROMPTS) * G,
        "num_generations": G,
        "max_completion_length": MAX_NEW,
        "temperature": TEMPERATURE,
        "beta": beta,
        "epsilon": rl.get("epsilon", 0.2),
        "report_to": "none",
        "use_cpu": True,
        "num_iterations": 2,
        "bf16": False,  # TRL's default autocasts to bf16, even on CPU
    }
    if "epsilon_high" in rl:
        common["epsilon_high"] = rl["epsilon_high"]
    if "kl_bias_correction" in rl:
        common["use_bias_correction_kl"] = rl["kl_bias_correction"]
    if algorithm == "grpo":
        args = trl.GRPOConfig(
            **common,
            loss_type=rl.get("loss_type", "dapo"),
            scale_rewards=rl.get("scale_rewards", "group"),
        )
        trainer_cls = trl.GRPOTrainer
    else:
        args = trl.RLOOConfig(**common, normalize_advantages=rl.get("normalize_advantages", False))
        trainer_cls = trl.RLOOTrainer
    from datasets import Dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(
            model=copy.deepcopy(policy),
            reward_funcs=lambda prompts, completions, **kw: list(REWARDS),
            args=args,
            train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS] * G),
            processing_class=tokenizer,
        )
    reference = copy.deepcopy(policy)
    perturbed(reference, 0.05, seed=1)
    if trainer.ref_model is not None:
        trainer.ref_model.load_state_dict(reference.state_dict())
    trainer.current_gradient_accumulation_steps = 1
    theirs_in = trl_inputs(trainer, tokenizer, rloo=algorithm == "rloo")

    # Ours: the same rows, rewards and reference.
    cfg = Config.from_dict(
        {
            "model": {"name_or_path": str(folder)},
            "task": {"type": "rl"},
            "rl": {
                **rl,
                "rewards": [{"type": "length"}],
                "max_new_tokens": MAX_NEW,
                "temperature": TEMPERATURE,
                "group_size": G,
                "iterations": 2,
            },
            "data": {"train": "unused.jsonl"},
            "method": {"name": "full"},
        }
    )
    task = get_task(cfg)
    task.tokenizer = tokenizer
    task.reference = Reference("copy", reference.eval())
    mine = copy.deepcopy(policy).train()
    prompts, completions = fixed_rollouts(tokenizer)
    batch = completion_rows(prompts, completions, tokenizer.pad_token_id)
    where = batch["completion"][:, 1:]
    with torch.no_grad():
        batch["old_logps"] = task._score_rows(mine, batch).dense
        batch["ref_logps"] = task._reference_rows(mine, batch)
    batch["advantages"] = task._advantages(torch.tensor(REWARDS), [batch])
    torch.testing.assert_close(batch["advantages"], theirs_in["advantages"], atol=1e-6, rtol=1e-5)

    # Old log-probabilities away from the policy's, the same on both sides.
    mask = theirs_in["completion_mask"].bool()
    noise = fixed_old_logps(mask.shape)
    if algorithm == "rloo":
        per_token = batch["old_logps"].clone()
        per_token[where] += noise[mask]
        batch["old_logps"] = per_token
        theirs_in["old_logps"] = (per_token * where).sum(1)
    else:
        theirs_in["old_per_token_logps"] = (
            torch.zeros(mask.shape).masked_scatter(mask, batch["old_logps"][where]) + noise
        ) * mask
        per_token = batch["old_logps"].clone()
        per_token[where] = theirs_in["old_per_token_logps"][mask]
        batch["old_logps"] = per_token

    out = task.forward(mine, batch)
    ours = task.loss_sum(out, batch) / task.count_targets(batch)
    clipped = task.take_parts()
    theirs = trainer._compute_loss(trainer.model, theirs_in)
    share = clipped["clipped"] / clipped["scored_tokens"]
    return float(ours), float(theirs), grads(mine, ours), grads(trainer.model, theirs), share


def assert_same(result) -> None:
    ours, theirs, g_ours, g_theirs, share = result
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert ours != 0.0
    assert g_ours.keys() == g_theirs.keys() and g_ours
    for name, grad in g_ours.items():
        torch.testing.assert_close(grad, g_theirs[name], atol=1e-5, rtol=1e-4, msg=name)
    assert share > 0  # the fixed old log-probabilities make the clip bite somewhere


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo", "dr_grpo"])
def test_grpo_loss_types_equal_trl(models, loss_type):
    assert_same(run_both(models, {"loss_type": loss_type}))


@pytest.mark.parametrize("scale_rewards", ["batch", "none"])
def test_grpo_reward_scaling_equals_trl(models, scale_rewards):
    assert_same(run_both(models, {"scale_rewards": scale_rewards, "loss_type": "grpo"}))


@pytest.mark.parametrize("correction", [True, False])
def test_grpo_with_kl_term_and_upper_clip_equals_trl(models, correction):
    rl = {"beta": 0.1, "epsilon_high": 0.28, "kl_bias_correction": correction}
    assert_same(run_both(models, rl))


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_equals_trl(models, normalize):
    rl = {"algorithm": "rloo", "beta": 0.05}
    if normalize:
        rl["normalize_advantages"] = True
    assert_same(run_both(models, rl))
