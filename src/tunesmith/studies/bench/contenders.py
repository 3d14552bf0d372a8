"""The two contenders of a pair: HF ``Trainer`` (+ ``peft``) and tunesmith, same settings."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

from tunesmith.studies.bench.measure import matmul_peak_flops, read_jsonl
from tunesmith.training.monitor import peak_rss_mb
from tunesmith.training.precision import cpu_bf16_native

#: HF Trainer twice: its default random batches, and length-grouped ones
#: (``train_sampling_strategy="group_by_length"``), the comparison a careful user makes.
CONTENDERS = ("hf", "hf_grouped", "tunesmith")
BASELINES = ("hf", "hf_grouped")
#: tunesmith with its default ``precision: auto`` (bf16 autocast where the CPU runs bf16
#: natively) against HF Trainer's defaults (fp32 on CPU): the comparison a user makes.
#: Run only on such CPUs; elsewhere ``auto`` is fp32 and would repeat the fp32 arm.
AUTO = "tunesmith_auto"
NAMES = {
    "hf": "HF Trainer",
    "hf_grouped": "HF Trainer, length-grouped",
    "tunesmith": "tunesmith",
    AUTO: "tunesmith, precision auto (bf16)",
}

#: (baseline, results key, tunesmith arm) of every ratio the tables show.
RATIOS = (("hf", "ratios", "tunesmith"), ("hf_grouped", "ratios_grouped", "tunesmith"))
RATIOS += (("hf", "ratios_auto", AUTO),)


def contenders_here() -> tuple[str, ...]:
    """The contenders this machine runs: the fp32 three, plus ``AUTO`` with native bf16."""
    return CONTENDERS + ((AUTO,) if cpu_bf16_native() else ())


LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["query", "value"]}
TOP_LAYERS = 2
#: pair -> (tunesmith ``method`` section, default peak LR (adapters need larger ones),
#: epochs (None: the run's)). ``top2x3`` is where the frozen-prefix feature cache pays:
#: tunesmith runs the 4 frozen blocks once, HF Trainer in every epoch.
PAIRS: dict[str, tuple[dict[str, Any], float, int | None]] = {
    "full": ({"name": "full"}, 5e-5, None),
    "lora": ({"name": "lora", **LORA}, 1e-3, None),
    "top2": ({"name": "freeze", "train_layers": TOP_LAYERS}, 2e-4, None),
    "top2x3": ({"name": "freeze", "train_layers": TOP_LAYERS}, 2e-4, 3),
}
_NEVER = 10**9  # tunesmith eval_steps: no evaluation during training


@dataclass
class RunSpec:
    """Everything one contender's process needs (written to JSON for the child)."""

    contender: str
    pair: str
    model: str
    files: dict[str, str]
    labels: list[str]
    lr: float
    epochs: int = 1
    batch_size: int = 16
    max_length: int = 64
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    seed: int = 0
    threads: int | None = None
    run_dir: str = "runs/vs_hf/run"
    matmul_size: int = 2048  # of the square matrices timed for the fp32 matmul peak


# -- the two contenders ----------------------------------------------------------
class TokenCounter:
    """Wraps a collator; counts real (attention-mask) and padded tokens of every batch built."""

    def __init__(self, collator: Any) -> None:
        self.collator, self.real, self.padded, self.batches = collator, 0, 0, 0

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        batch = self.collator(features)
        mask = batch["attention_mask"]
        self.real += int(mask.sum())
        self.padded += int(mask.numel())
        self.batches += 1
        return batch


def hf_model(spec: RunSpec) -> Any:
    """The model as an HF user prepares it: peft LoRA, or freeze all but the top blocks."""
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(spec.seed)
    id2label = dict(enumerate(spec.labels))
    label2id = {lab: i for i, lab in id2label.items()}
    model = AutoModelForSequenceClassification.from_pretrained(
        spec.model, num_labels=len(id2label), id2label=id2label, label2id=label2id
    )
    if spec.pair == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,  # peft keeps the classifier trainable
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"],
        )
        model = get_peft_model(model, config)
    elif spec.pair.startswith("top2"):
        base, n = model.base_model_prefix, model.config.num_hidden_layers
        keep = (
            *(f"{base}.encoder.layer.{i}." for i in range(n - TOP_LAYERS, n)),
            f"{base}.pooler.",
        )
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(keep) or not name.startswith(base + "."))
    return model


def hf_training_args(spec: RunSpec) -> Any:
    """TrainingArguments matching the spec; keys this transformers lacks are left out."""
    import dataclasses

    import torch
    from transformers import TrainingArguments

    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
        optim = "adamw_torch_fused"
    except (RuntimeError, TypeError):
        optim = "adamw_torch"
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    # transformers 5 dropped warmup_ratio: a warmup_steps below 1 is a ratio there.
    warmup = "warmup_ratio" if "warmup_ratio" in fields else "warmup_steps"
    kwargs = dict(output_dir=spec.run_dir, num_train_epochs=spec.epochs, seed=spec.seed)
    kwargs |= dict(per_device_train_batch_size=spec.batch_size, learning_rate=spec.lr)
    kwargs |= dict(per_device_eval_batch_size=2 * spec.batch_size, max_grad_norm=1.0)
    kwargs |= {"weight_decay": spec.weight_decay, warmup: spec.warmup_ratio}
    kwargs |= dict(lr_scheduler_type="linear", optim=optim, use_cpu=True, bf16=False, fp16=False)
    kwargs |= dict(dataloader_num_workers=0, eval_strategy="no", save_strategy="no")
    kwargs |= dict(logging_strategy="no", report_to=[], disable_tqdm=True)
    if spec.contender == "hf_grouped":  # named train_sampling_strategy since transformers 5
        kwargs |= dict(group_by_length=True, train_sampling_strategy="group_by_length")
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in fields})


def run_hf(spec: RunSpec) -> dict[str, Any]:
    """Train and test with HF Trainer + DataCollatorWithPadding (the usual recipe)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer

    tokenizer = AutoTokenizer.from_pretrained(spec.model)
    label2id = {lab: i for i, lab in enumerate(spec.labels)}

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(batch["text"], truncation=True, max_length=spec.max_length)
        return {**enc, "labels": [label2id[lab] for lab in batch["label"]]}

    train_ds, test_ds = (
        Dataset.from_list(read_jsonl(spec.files[s])).map(
            encode, batched=True, remove_columns=["text", "label"]
        )
        for s in ("train", "test")
    )
    counter = TokenCounter(DataCollatorWithPadding(tokenizer))
    model = hf_model(spec)
    args = hf_training_args(spec)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=counter)
    out = trainer.train()
    real, padded = counter.real, counter.padded  # before predict() collates test batches
    train_peak = peak_rss_mb()
    pred = trainer.predict(test_ds)
    accuracy = float((pred.predictions.argmax(-1) == pred.label_ids).mean())
    return {
        "train_seconds": out.metrics["train_runtime"],
        "real_tokens": real,
        "padded_tokens": padded,
        "steps": out.global_step,
        "train_peak_rss_mb": train_peak,
        "samples": len(train_ds) * spec.epochs,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "test_accuracy": accuracy,
    }


def tunesmith_settings(spec: RunSpec) -> dict[str, Any]:
    """The tunesmith config (as a dict) equivalent to the HF arguments."""
    data = {**spec.files, "text_column": "text", "label_column": "label", "labels": spec.labels}
    optim = {"lr": spec.lr, "weight_decay": spec.weight_decay, "max_grad_norm": 1.0}
    train = {"epochs": spec.epochs, "batch_size": spec.batch_size, "seed": spec.seed}
    train |= {"eval_steps": _NEVER, "early_stopping_patience": None, "save_minutes": None}
    precision = "auto" if spec.contender == AUTO else "fp32"
    train |= {"precision": precision, "num_threads": spec.threads}
    return {
        "model": {"name_or_path": spec.model},
        "task": {"type": "sequence_classification"},
        "data": data | {"max_length": spec.max_length},
        "method": PAIRS[spec.pair][0],
        "optim": optim | {"scheduler": "linear", "warmup_ratio": spec.warmup_ratio},
        "train": train | {"output_dir": spec.run_dir, "overwrite": True},
        "eval": {"metric": "accuracy"},
    }


def tunesmith_model(spec: RunSpec) -> Any:
    """The model as ``tunesmith.runs.train.train`` prepares it (for the same-parameters check)."""
    from accelerate.utils import set_seed

    from tunesmith.config.root import Config
    from tunesmith.methods.base import get_method
    from tunesmith.models.loading import load_tokenizer, quiet_transformers
    from tunesmith.tasks.base import get_task

    quiet_transformers()
    cfg = Config.from_dict(tunesmith_settings(spec), source=f"bench:{spec.pair}")
    task = get_task(cfg)
    tokenizer = load_tokenizer(spec.model)
    set_seed(spec.seed)
    return get_method(cfg).apply(task.build_model(spec.labels, tokenizer))


def run_tunesmith(spec: RunSpec) -> dict[str, Any]:
    """Train and test through the public API; numbers come from its ``summary.json``."""
    from tunesmith.config.root import Config
    from tunesmith.runs.train import train

    result = train(Config.from_dict(tunesmith_settings(spec)), progress=False)
    summary = json.loads((result.output_dir / "summary.json").read_text())
    return {
        "train_seconds": result.loop.train_seconds,  # summary.json rounds it
        "real_tokens": result.loop.real_tokens,
        "steps": summary["steps"],
        "train_peak_rss_mb": summary["peak_rss_mb"],  # the process's peak at the loop's end
        "samples": len(read_jsonl(spec.files["train"])) * spec.epochs,
        "trainable_parameters": summary["trainable_parameters"],
        "test_accuracy": summary["test"]["accuracy"],
    }


def run_contender(spec: RunSpec) -> dict[str, Any]:
    """One contender's run plus this process's peak memory, load and wall time."""
    import torch

    start = time.perf_counter()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    result = (run_hf if spec.contender in BASELINES else run_tunesmith)(spec)
    return {
        **result,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "process_seconds": round(time.perf_counter() - start, 2),
        # after the peaks are read: one more sample of the machine's peak, under the run's load
        "matmul_peak_flops": matmul_peak_flops(spec.matmul_size, threads=spec.threads),
    }
