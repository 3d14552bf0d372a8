"""Evaluating and predicting with a saved checkpoint (the public ``evaluate`` / ``predict``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from tunesmith.config.root import Config
from tunesmith.config.tasks import GenerateConfig
from tunesmith.data.batching import Collator, FeatureDataset
from tunesmith.errors import ConfigError, DataError
from tunesmith.runs.load import load_checkpoint, records_for
from tunesmith.runs.rewards import rl_rewards
from tunesmith.tasks.base import Task
from tunesmith.tasks.inference import evaluate_dataset, predict_dataset
from tunesmith.training.precision import eval_autocast


def evaluate(
    checkpoint: str | Path,
    data: str | None = None,
    *,
    split: str | None = None,
    records: list[dict[str, Any]] | None = None,
    batch_size: int = 64,
    trust_remote_code: bool = False,
    allow_unsafe_weights: bool = False,
) -> dict[str, Any]:
    """Metrics of a saved checkpoint on a file, on a split of its run, or on records.

    Args:
        checkpoint: A ``best/`` or ``final/`` folder.
        data: A labelled data file (same columns as in training).
        split: ``validation`` or ``test``: the rows of that split of the run the
            checkpoint came from (as recorded in ``splits.json``).
        records: Already loaded records (used by ``train`` for the test split).
        batch_size: Evaluation batch size.
        trust_remote_code: Run the model folder's own code (only for folders you trust).
        allow_unsafe_weights: Accept pickle weights (loaded with ``weights_only=True``).
    """
    cfg, task, model, tokenizer, labels = load_checkpoint(
        checkpoint, trust_remote_code=trust_remote_code, allow_unsafe_weights=allow_unsafe_weights
    )
    if task.online:  # validation scores the completions it samples
        task.rewards = rl_rewards(cfg.rl)
    if records is None:
        records = records_for(task, cfg, checkpoint, data, split)
    task.check_labels(records, {lab: i for i, lab in enumerate(labels)}, split or "evaluation")
    dataset = FeatureDataset(
        task.encode(records, tokenizer, {lab: i for i, lab in enumerate(labels)})
    )
    with eval_autocast(cfg.train.precision, next(model.parameters()).device):
        metrics, _ = evaluate_dataset(
            model,
            task,
            dataset,
            Collator(tokenizer.pad_token_id, tokenizer.padding_side),
            labels,
            batch_size,
            generate=cfg.generate.in_eval,
        )
    return metrics


def predict(
    checkpoint: str | Path,
    texts: list[str] | None = None,
    *,
    input_path: str | None = None,
    batch_size: int = 64,
    trust_remote_code: bool = False,
    allow_unsafe_weights: bool = False,
    generate: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Predictions of a saved checkpoint for texts or an (unlabelled) data file.

    The permissions are as for ``evaluate``: the caller's, never the checkpoint's.
    ``generate`` overrides keys of the run's ``generate`` section (generative
    tasks: ``max_new_tokens``, ``num_beams``, ``do_sample``, ...).
    """
    cfg, task, model, tokenizer, labels = load_checkpoint(
        checkpoint, trust_remote_code=trust_remote_code, allow_unsafe_weights=allow_unsafe_weights
    )
    if generate:
        task.cfg = cfg.model_copy(update={"generate": generation_settings(cfg, generate)})
    records = input_records(task, texts, input_path)
    return predict_records(model, task, tokenizer, labels, records, batch_size)


def generation_settings(cfg: Config, changes: Mapping[str, Any]) -> GenerateConfig:
    """The run's ``generate`` section with ``changes`` applied and validated.

    Raises:
        ConfigError: Naming the unknown or invalid key.
    """
    merged = {**cfg.generate.model_dump(), **changes}
    try:
        return GenerateConfig(**merged)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "generate"
        raise ConfigError(f"generation option {key}: {first['msg']}") from None


def input_records(
    task: Task, texts: list[str] | None, input_path: str | None
) -> list[dict[str, Any]]:
    """Records to predict from texts or an unlabelled file (the task's column mapping)."""
    if input_path is not None:
        return task.load_records(input_path, labelled=False)
    if texts:
        return task.text_records(texts)
    raise DataError("nothing to predict: give texts or an input file")


def predict_records(
    model: torch.nn.Module,
    task: Task,
    tokenizer: Any,
    labels: list[str],
    records: list[dict[str, Any]],
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """One prediction row per record (``text`` plus the task's outputs), in order."""
    dataset = FeatureDataset(task.encode(records, tokenizer, None))
    return predict_features(model, task, tokenizer, labels, records, dataset, batch_size)


def predict_features(
    model: torch.nn.Module,
    task: Task,
    tokenizer: Any,
    labels: list[str],
    records: list[dict[str, Any]],
    dataset: FeatureDataset,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """``predict_records`` for records already encoded (``dataset``: their features, in order)."""
    collator = Collator(tokenizer.pad_token_id, tokenizer.padding_side)
    preds, _ = predict_dataset(task, model, dataset, collator, batch_size, generate=True)
    rows = task.format_predictions(preds, labels, records)
    return [{"text": r["text"], **row} for r, row in zip(records, rows, strict=True)]
