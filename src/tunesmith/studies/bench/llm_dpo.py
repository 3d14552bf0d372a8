"""The ``dpo`` pair of the TRL benchmark: TRL's ``DPOTrainer`` against tunesmith's DPO.

Fairness: one ``prepare`` child splits the pairs of a tunesmith preference
config once and writes them as conversational rows (``prompt``, ``chosen``,
``rejected`` message lists); both sides tokenise them through the same chat
template, which gives the same tokens (``tests/test_preference_trl.py``
checks it), and the pairs and reply tokens are counted on both sides from the
batches actually built and must be equal. Same model, LoRA, batch size, one
epoch, peak LR, schedule, warmup, no weight decay, clip norm 1.0, AdamW, seed,
fp32, threads, loss (sigmoid) and beta; the reference is the base with the
adapter off on both sides. TRL keeps its own recipe otherwise: padded batches
in random order (its pairs have no length column to group by). After training,
both score the same validation pairs: the reward accuracy (how often the chosen
reply's implicit reward beats the rejected one's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.studies.bench.llm import (
    LLMSpec,
    load_config,
    prepare_split,
    run_overrides,
    trl_arguments,
    trl_lora,
    write_jsonl,
)
from tunesmith.training.monitor import peak_rss_mb


def _pair_files(
    name: str, records: list[dict[str, Any]], features: list[dict[str, Any]], out: Path
) -> tuple[dict, dict]:
    """The pairs as conversational rows (both sides tokenise them); counts from the features."""
    rows = [
        {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in records
    ]
    lengths = [
        (len(f["input_ids"]), len(f["rejected_input_ids"]), f["prompt_length"]) for f in features
    ]
    counts = {
        "rows": len(features),
        "real_tokens": sum(c + r for c, r, _ in lengths),
        "trained_tokens": sum(c + r - 2 * p for c, r, p in lengths),
    }
    return {name: write_jsonl(out / f"{name}.jsonl", rows)}, counts


def prepare_pairs(spec: LLMSpec) -> dict[str, Any]:
    """Split once; write the pairs as conversational rows for both sides."""
    return prepare_split(spec, _pair_files)


def dpo_tunesmith(spec: LLMSpec) -> dict[str, Any]:
    """tunesmith's DPO on the prepared pairs: one epoch, validation once after training."""
    from tunesmith.runs.train import train

    overrides = run_overrides(spec, ["data.format=preference"])
    result = train(load_config(spec, overrides), progress=False, test=False)
    loop = result.loop
    return {
        "train_seconds": loop.train_seconds,
        "pairs": int(loop.targets),
        "real_tokens": loop.real_tokens,
        "steps": loop.steps,
        "train_peak_rss_mb": loop.peak_rss_mb,
        "reward_accuracy": loop.last_validation["reward_accuracy"],
    }


class _PairCounter:
    """Wraps TRL's collator: counts pairs, real tokens and reply tokens of every batch."""

    def __init__(self, collator: Any) -> None:
        self.collator, self.pairs, self.real, self.trained = collator, 0, 0, 0

    def __call__(self, examples: list[dict[str, Any]]) -> Any:
        batch = self.collator(examples)
        self.pairs += batch["input_ids"].shape[0] // 2
        self.real += int(batch["attention_mask"].sum())
        self.trained += int(batch["completion_mask"].sum())
        return batch


def dpo_trl(spec: LLMSpec) -> dict[str, Any]:
    """TRL's ``DPOTrainer`` with peft LoRA on the prepared pairs (settings: module docstring)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from tunesmith.studies.bench.measure import read_jsonl

    cfg = load_config(spec)
    model_path = spec.files["model"]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if cfg.task.chat_template:
        tokenizer.chat_template = cfg.task.chat_template
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    args = DPOConfig(**trl_arguments(spec, cfg), loss_type=["sigmoid"], beta=cfg.preference.beta)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(read_jsonl(spec.files["train"])),
        eval_dataset=Dataset.from_list(read_jsonl(spec.files["validation"])),
        processing_class=tokenizer,
        peft_config=trl_lora(cfg),
    )
    counter = _PairCounter(trainer.data_collator)
    trainer.data_collator = counter
    out = trainer.train()
    train_peak = peak_rss_mb()
    counted = (counter.pairs, counter.real, counter.trained)
    metrics = trainer.evaluate()
    return {
        "train_seconds": out.metrics["train_runtime"],
        "pairs": counted[0],
        "real_tokens": counted[1],
        "trained_tokens": counted[2],
        "steps": out.global_step,
        "train_peak_rss_mb": train_peak,
        "reward_accuracy": metrics["eval_rewards/accuracies"],
    }
