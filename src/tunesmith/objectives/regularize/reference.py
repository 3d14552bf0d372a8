"""The reference task of the ``forgetting`` section: its model, its data, and the report.

The reference is what fine-tuning should not forget. With
``forgetting.reference_checkpoint`` it is a saved tunesmith model of any
classification-like task (say, sentiment) while the run learns another (say,
NER): its *head* keeps scoring the reference task, and after training the
run's *encoder* weights are put under that head (matched by name under the
transformers base model, e.g. ``bert.``), which is how much of the old skill
the shared weights kept. Without a checkpoint the reference is the run's own
model and task on ``reference_data``. A generative run's reference is general
text (``reference_text``): its held-out perplexity, before and after.

``retention`` of the reference task's headline metric goes into
``summary.json`` and ``metrics.jsonl``: ``after / before`` where higher is
better (accuracy, entity F1), ``before / after`` where lower is (perplexity),
so 1.0 means nothing forgotten and less means worse, whichever the metric.
A text reference also reports ``ppl_ratio = after / before``, the number
``forgetting.max_ppl_increase`` limits.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.data.batching import Collator, FeatureDataset
from tunesmith.data.chat import read_chat_file, read_options
from tunesmith.errors import DataError, ModelError
from tunesmith.objectives.regularize.penalties import plain_name
from tunesmith.tasks.inference import evaluate_dataset

log = logging.getLogger(__name__)


@dataclass
class Reference:
    """The reference task, ready to score and to estimate a Fisher on.

    Attributes:
        task: The reference task (the checkpoint's, or the run's).
        labels: Its labels.
        records: The reference examples (a seeded subset).
        features: ``records`` encoded for ``model``.
        collator: Pads ``features``.
        model: The reference checkpoint's model, or None: the run's own model.
        checkpoint: The reference checkpoint folder, or None.
    """

    task: Any
    labels: list[str]
    records: list[dict[str, Any]]
    features: list[dict[str, Any]]
    collator: Collator
    model: nn.Module | None = None
    checkpoint: Path | None = None
    #: Text reference with replay: the documents replayed (never the measured ones).
    replay_records: list[dict[str, Any]] | None = None

    @property
    def metric(self) -> str:
        """The reference task's headline metric."""
        return self.task.default_metric(self.task.cfg)

    @property
    def higher_is_better(self) -> bool:
        """The direction of ``metric``, as the reference task declares it."""
        return self.task.higher_is_better(self.metric, self.task.cfg)

    def score(self, model: nn.Module, batch_size: int = 64) -> dict[str, Any]:
        """The reference task's metrics for ``model`` (which must do the reference task)."""
        metrics, _ = evaluate_dataset(
            model, self.task, FeatureDataset(self.features), self.collator, self.labels, batch_size
        )
        return metrics


def load_reference(
    cfg: Any,
    run_task: Any,
    tokenizer: Any,
    labels: list[str],
    checkpoint: tuple[Any, nn.Module, Any, list[str]] | None = None,
) -> Reference:
    """Read the reference data that ``cfg.forgetting`` names, for the reference model.

    ``checkpoint`` is the loaded ``forgetting.reference_checkpoint`` (its task,
    model, tokenizer and labels; loaded by the recipe layer, which knows every
    checkpoint format), or None when the run's own starting model is the
    reference.

    Raises:
        DataError: No reference data can be found, or a label is unknown to the
            reference model.
    """
    f = cfg.forgetting
    if f.reference_text is not None:
        return _text_reference(cfg, run_task, tokenizer, labels)
    if checkpoint is None:
        task, ref_tokenizer, ref_labels, model, folder = run_task, tokenizer, labels, None, None
    else:
        folder = Path(f.reference_checkpoint)
        task, model, ref_tokenizer, ref_labels = checkpoint
    records = _reference_records(task, f.reference_data, folder)
    rng = random.Random(cfg.train.seed)
    if f.reference_samples is not None and len(records) > f.reference_samples:
        records = rng.sample(records, f.reference_samples)
    label2id = {lab: i for i, lab in enumerate(ref_labels)}
    task.check_labels(records, label2id, "reference")
    features = task.encode(records, ref_tokenizer, label2id)
    collator = Collator(ref_tokenizer.pad_token_id, ref_tokenizer.padding_side)
    return Reference(task, list(ref_labels), records, features, collator, model, folder)


def _text_reference(cfg: Any, task: Any, tokenizer: Any, labels: list[str]) -> Reference:
    """General text scored by the run's own model; with replay, measured and replayed apart.

    The documents are shuffled (``train.seed``); with ``forgetting.replay`` the
    first half (at most ``reference_samples``) is measured and the rest
    replayed, so the perplexity is never measured on text the run trained on.
    """
    f = cfg.forgetting
    _, records = read_chat_file(f.reference_text, read_options(cfg.data), fmt="text")
    random.Random(cfg.train.seed).shuffle(records)
    measured = len(records) // 2 if f.replay > 0 else len(records)
    if f.reference_samples is not None:
        measured = min(measured, f.reference_samples)
    if measured == 0 or (f.replay > 0 and measured == len(records)):
        raise DataError(
            f"forgetting.reference_text: {f.reference_text} has {len(records)} documents; "
            "measuring and replaying need at least 2 (blank-line separated paragraphs)"
        )
    held_out, rest = records[:measured], records[measured:]
    features = task.encode(held_out, tokenizer, {})
    collator = Collator(tokenizer.pad_token_id, tokenizer.padding_side)
    replay = rest if f.replay > 0 else None
    return Reference(task, list(labels), held_out, features, collator, replay_records=replay)


def _reference_records(
    task: Any, data: str | None, checkpoint: Path | None
) -> list[dict[str, Any]]:
    """``reference_data`` read by the reference task, else its run's validation split."""
    if data is not None:
        return task.load_records(data, dropped=[])
    assert checkpoint is not None  # the config requires data or a checkpoint
    import json

    where = checkpoint.resolve().parent / "splits.json"
    if not where.is_file():
        raise DataError(
            f"forgetting.reference_data is not set and {where} does not exist; give the "
            "reference data file"
        )
    return task.split_records(json.loads(where.read_text(encoding="utf-8")), "validation", where)


def replay_features(
    ref: Reference, run_task: Any, tokenizer: Any, labels: list[str]
) -> list[dict[str, Any]]:
    """The reference examples encoded for the run's own task and labels (for replay).

    Raises:
        DataError: The reference task is another task type, or a reference
            label is not one of the run's labels.
    """
    if ref.task.name != run_task.name:
        raise DataError(
            f"forgetting.replay: reference examples are {ref.task.name} examples; the run "
            f"trains {run_task.name}, so they cannot share its batches (use forgetting.ewc)"
        )
    records = ref.records if ref.replay_records is None else ref.replay_records
    label2id = {lab: i for i, lab in enumerate(labels)}
    run_task.check_labels(records, label2id, "reference (replay)")
    return run_task.encode(records, tokenizer, label2id)


def _encoder(model: nn.Module) -> nn.Module:
    """The transformers base model (``bert``, ``model``, ...) under any wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(inner, "base_model", inner)
    return base if isinstance(base, nn.Module) else inner


def encoder_parameters(model: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """Encoder-relative plain name -> (the model's own parameter name, parameter)."""
    encoder = _encoder(model)
    own = {id(p): n for n, p in model.named_parameters()}
    return {plain_name(n): (own[id(p)], p) for n, p in encoder.named_parameters() if id(p) in own}


def transplant_encoder(source: nn.Module, target: nn.Module) -> int:
    """Copy ``source``'s encoder weights into ``target``'s (same names and shapes).

    Adapter models are merged first, so the copied weights are the effective ones.

    Raises:
        ModelError: No weight matched (another architecture).
    """
    from peft import PeftModel

    if isinstance(source, PeftModel):
        source = source.merge_and_unload()
    src = {n: p for n, (_, p) in encoder_parameters(source).items()}
    copied = 0
    with torch.no_grad():
        for name, (_, p) in encoder_parameters(target).items():
            if name in src and src[name].shape == p.shape:
                p.copy_(src[name])
                copied += 1
    if not copied:
        raise ModelError(
            "forgetting: the trained model shares no encoder weights with the reference "
            "checkpoint (another architecture?)"
        )
    return copied


def forgetting_report(
    before: dict[str, Any], after: dict[str, Any], metric: str, *, higher_is_better: bool = True
) -> dict[str, Any]:
    """``{metric, before, after, retention, ...}``; retention None when it cannot be computed.

    Retention is after / before for a metric where higher is better and
    before / after where lower is, so below 1.0 is forgetting either way.
    Perplexity also gets ``ppl_ratio`` (after / before: 1.10 is 10% worse).
    """
    b, a = before.get(metric), after.get(metric)
    numbers = isinstance(a, int | float) and isinstance(b, int | float)
    ratio = a / b if numbers and b else None
    if ratio is not None and not higher_is_better:
        ratio = 1 / ratio if ratio else None
    report = {
        "metric": metric,
        "before": b,
        "after": a,
        "retention": round(ratio, 6) if ratio is not None else None,
        "loss_before": before.get("loss"),
        "loss_after": after.get("loss"),
    }
    if metric == "perplexity" and numbers and b:
        report["ppl_ratio"] = round(a / b, 6)
    return report
