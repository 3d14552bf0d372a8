"""tunesmith against TRL on causal-LM post-training, one contender per process.

Why: LLM users pick TRL; a speed or memory claim is worth saying only with
TRL's trainer run next to ours, on the same machine in the same invocation.
Each *pair* (``sft`` here, ``dpo`` in ``llm_dpo``; the registry is
``llm_pairs.PAIRS``) names a function per contender; the orchestration, the
machine report, the per-process memory reading and the table are shared.

Fairness (``sft``): one ``prepare`` child splits the chat data of a tunesmith
config once, writes the chats (for tunesmith) and tunesmith's own tokenised
features, ``input_ids`` plus ``labels`` masked to the assistant replies (for
TRL, whose ``SFTTrainer`` takes a tokenised dataset as is), so both train on
the same tokens; trained tokens are counted on both sides from the batches
actually built and must be equal. Same model, LoRA (rank, alpha, dropout,
target modules), batch size, one epoch over the same rows, peak LR, cosine
schedule with the same warmup ratio, no weight decay, clip norm 1.0, AdamW,
seed, fp32, threads; no evaluation, logging or checkpoint while training.
TRL keeps its own recipe otherwise: length-grouped batches
(``train_sampling_strategy="group_by_length"``, offered by the transformers
Trainer it builds on), padded batches (its ``padding_free`` needs a
flash-attention kernel, absent on CPU), its default ``nll`` loss (which runs
the LM head in chunks itself). Its defaults turn gradient checkpointing on;
``--gradient-checkpointing`` sets it the same on both sides (off by default:
a memory-for-speed trade a user chooses, reported per arm). The validation
loss is computed the same way on both sides after training: summed
reply-token cross-entropy over the validation chats divided by their count.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.training.monitor import peak_rss_mb


@dataclass
class LLMSpec:
    """What one contender's process needs (written to JSON for the child)."""

    contender: str
    pair: str
    config: str
    work: str
    files: dict[str, str] = field(default_factory=dict)
    rows: int = 160
    threads: int | None = None
    gradient_checkpointing: bool = False
    overrides: list[str] = field(default_factory=list)


def load_config(spec: LLMSpec, extra: list[str] | None = None) -> Any:
    """The tunesmith config of the pair, with the benchmark's overrides."""
    from tunesmith.config.root import Config

    return Config.load(spec.config, overrides=[*spec.overrides, *(extra or [])])


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    """Write ``rows`` as JSON lines; returns the path as a string."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


#: Writes one split for both contenders: (split name, records, tunesmith's features,
#: folder) -> (files written by key, counts of what will be trained).
SplitWriter = Callable[[str, list[dict[str, Any]], list[dict[str, Any]], Path], tuple[dict, dict]]


def prepare_split(spec: LLMSpec, write: SplitWriter) -> dict[str, Any]:
    """Split the pair's data once, encode it as tunesmith would, ``write`` each split."""
    from tunesmith.models.loading import load_tokenizer, quiet_transformers
    from tunesmith.studies.bench.measure import machine_info
    from tunesmith.tasks.base import get_task

    quiet_transformers()
    cfg = load_config(spec, [f"data.max_train_samples={spec.rows}"])
    task = get_task(cfg)
    splits = task.load_splits()
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    out = Path(spec.work) / "data"
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {"model": str(cfg.model.name_or_path)}
    counts = {}
    for name in ("train", "validation"):
        records = getattr(splits, name)
        written, counts[name] = write(name, records, task.encode(records, tokenizer, {}), out)
        files |= written
    return {"files": files, "counts": counts, "machine": machine_info() | extra_versions()}


def _chat_files(
    name: str, records: list[dict[str, Any]], features: list[dict[str, Any]], out: Path
) -> tuple[dict, dict]:
    """Chats for tunesmith, tokenised features (ids, reply labels) for TRL."""
    rows = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
    files = {
        name: write_jsonl(out / f"{name}.jsonl", [{"messages": r["messages"]} for r in records]),
        f"{name}_features": write_jsonl(out / f"{name}_features.jsonl", rows),
    }
    counts = {
        "rows": len(rows),
        "real_tokens": sum(len(r["input_ids"]) for r in rows),
        "trained_tokens": sum(sum(x != -100 for x in r["labels"][1:]) for r in rows),
    }
    return files, counts


def prepare_chats(spec: LLMSpec) -> dict[str, Any]:
    """Split once; write chats for tunesmith and tokenised features for TRL (module docstring)."""
    return prepare_split(spec, _chat_files)


def extra_versions() -> dict[str, str]:
    import importlib.metadata as md

    try:
        return {"trl": md.version("trl")}
    except md.PackageNotFoundError:
        return {"trl": "not installed"}


def run_overrides(spec: LLMSpec, extra: list[str]) -> list[str]:
    """tunesmith's side of every pair: the prepared files, one epoch, no evaluation until the
    end, no checkpoints, fp32, the spec's threads and checkpointing; plus ``extra``."""
    overrides = [
        f"data.train={spec.files['train']}",
        f"data.validation={spec.files['validation']}",
        "data.test=null",
        "data.test_fraction=0",
        "data.max_train_samples=null",
        "train.epochs=1",
        "train.max_steps=null",
        "train.eval_at_start=false",
        "train.eval_steps=1000000",
        "train.save_minutes=null",
        "train.precision=fp32",
        f"train.gradient_checkpointing={str(spec.gradient_checkpointing).lower()}",
        f"train.output_dir={Path(spec.work) / 'tunesmith'}",
        "train.overwrite=true",
        *extra,
    ]
    if spec.threads:
        overrides.append(f"train.num_threads={spec.threads}")
    return overrides


def trl_lora(cfg: Any) -> Any:
    """peft's LoRA config equal to the tunesmith config's ``method`` section."""
    from peft import LoraConfig

    m = cfg.method
    return LoraConfig(
        r=m.r,
        lora_alpha=m.alpha if m.alpha is not None else 2 * m.r,  # tunesmith's default
        lora_dropout=m.dropout,
        use_rslora=m.rslora,
        target_modules=list(m.target_modules),
        task_type="CAUSAL_LM",
    )


def trl_arguments(spec: LLMSpec, cfg: Any) -> dict[str, Any]:
    """TRL's training arguments shared by every pair: tunesmith's optimisation, CPU, quiet."""
    o, t = cfg.optim, cfg.train
    return dict(
        output_dir=str(Path(spec.work) / "trl"),
        num_train_epochs=1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        learning_rate=o.lr,
        lr_scheduler_type=o.scheduler,
        warmup_steps=o.warmup_ratio,  # transformers 5: below 1 is a ratio
        weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm,
        optim="adamw_torch",
        seed=t.seed,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=spec.gradient_checkpointing,
        max_length=cfg.data.max_length,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


# -- the sft pair ---------------------------------------------------------------------
def sft_tunesmith(spec: LLMSpec) -> dict[str, Any]:
    """tunesmith on the prepared chats: one epoch, validation once after training."""
    from tunesmith.runs.train import train

    result = train(
        load_config(spec, run_overrides(spec, ["generate.in_eval=false"])),
        progress=False,
        test=False,
    )
    loop = result.loop
    return {
        "train_seconds": loop.train_seconds,
        "real_tokens": loop.real_tokens,
        "trained_tokens": int(loop.targets),
        "steps": loop.steps,
        "train_peak_rss_mb": loop.peak_rss_mb,
        "validation_loss": loop.last_validation["loss"],
    }


class _Counter:
    """Wraps TRL's collator: counts real and trained tokens of every batch it builds."""

    def __init__(self, collator: Any) -> None:
        self.collator, self.real, self.trained = collator, 0, 0

    def __call__(self, examples: list[dict[str, Any]]) -> Any:
        batch = self.collator(examples)
        self.real += int(batch["attention_mask"].sum())
        self.trained += int((batch["labels"][:, 1:] != -100).sum())
        return batch


def sft_trl(spec: LLMSpec) -> dict[str, Any]:
    """TRL's ``SFTTrainer`` with peft LoRA on the prepared features (settings: module docstring)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tunesmith.studies.bench.measure import read_jsonl

    cfg = load_config(spec)
    model_path = spec.files["model"]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    train_set = Dataset.from_list(read_jsonl(spec.files["train_features"]))
    args = SFTConfig(**trl_arguments(spec, cfg), train_sampling_strategy="group_by_length")
    counter = _Counter(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        processing_class=tokenizer,
        peft_config=trl_lora(cfg),
        data_collator=counter,
    )
    out = trainer.train()
    train_peak = peak_rss_mb()
    loss = validation_loss(trainer.model, read_jsonl(spec.files["validation_features"]))
    return {
        "train_seconds": out.metrics["train_runtime"],
        "real_tokens": counter.real,
        "trained_tokens": counter.trained,
        "steps": out.global_step,
        "train_peak_rss_mb": train_peak,
        "validation_loss": loss,
    }


def validation_loss(model: Any, rows: list[dict[str, Any]], batch_size: int = 8) -> float:
    """Summed cross-entropy of the labelled tokens over their number (tunesmith's definition)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(r["input_ids"]) for r in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, r in enumerate(chunk):
                n = len(r["input_ids"])
                ids[i, :n], labels[i, :n], mask[i, :n] = (
                    torch.tensor(r["input_ids"]),
                    torch.tensor(r["labels"]),
                    1,
                )
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            total += float(F.cross_entropy(logits.transpose(1, 2), target, reduction="sum"))
            count += int((target != -100).sum())
    return total / max(count, 1)
