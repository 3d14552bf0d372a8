"""Running a model over a data set: predictions, loss and task metrics.

Used by the training loop's evaluations and by ``tunesmith eval``/``predict``
alike, so a metric logged during training and one recomputed later come from
the same code. Batches are formed longest-first (least padding) and results
are put back in data order through each item's ``index``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.data import DataLoader

from tunesmith.data.batching import Collator, FeatureDataset, length_sorted_order
from tunesmith.tasks.base import Task


def make_eval_loader(
    task: Task, dataset: FeatureDataset, collator: Collator, batch_size: int
) -> DataLoader:
    """A DataLoader over ``dataset`` in longest-first order."""
    lengths = [task.feature_length(f) for f in dataset.features]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=length_sorted_order(lengths),
        collate_fn=collator,
    )


@torch.no_grad()
def predict_loader(
    model: torch.nn.Module,
    task: Task,
    loader: DataLoader,
    accelerator: Any | None = None,
    *,
    generate: bool = False,
    generate_limit: int | None = None,
) -> tuple[dict[str, torch.Tensor], float | None]:
    """Predictions for every item of ``loader`` in dataset order, and the mean loss.

    With ``generate``, generative tasks also generate text for each item
    (``Task.generate_predictions``; the other tasks add nothing), or only for
    the items of dataset index below ``generate_limit`` when it is set.

    Returns:
        The task's prediction tensors (first dim = items, dataset order) and the
        loss averaged over targets, or None when the data has no labels.
    """
    was_training = model.training
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {}
    loss_sum = torch.zeros((), dtype=torch.float64)
    targets = torch.zeros((), dtype=torch.float64)
    device = accelerator.device if accelerator is not None else _device_of(model)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        ctx = accelerator.autocast() if accelerator is not None else nullcontext()
        with ctx:
            outputs = task.forward(model, batch)
        labelled = task.scored(batch)
        if labelled:
            loss_sum += float(task.loss_sum(outputs, batch))
            targets += float(task.count_targets(batch))
        preds = task.outputs_to_predictions(outputs, batch)
        if generate:
            plain = accelerator.unwrap_model(model) if accelerator is not None else model
            preds |= task.generate_predictions(plain, batch, limit=generate_limit)
        preds["index"] = batch["index"]
        if accelerator is not None and accelerator.num_processes > 1:
            preds = accelerator.gather_for_metrics(_pad_for_gather(preds, accelerator))
        for key, value in preds.items():
            chunks.setdefault(key, []).append(value.cpu())
    if was_training:
        model.train()
    if accelerator is not None and accelerator.num_processes > 1:
        loss_sum = accelerator.reduce(loss_sum.to(device), "sum").cpu()
        targets = accelerator.reduce(targets.to(device), "sum").cpu()
    merged = {k: _cat(v) for k, v in chunks.items()}
    order = torch.argsort(merged.pop("index"))
    merged = {k: v[order] for k, v in merged.items()}
    mean_loss = float(loss_sum / targets) if targets > 0 else None
    return merged, mean_loss


def predict_dataset(
    task: Task,
    model: torch.nn.Module,
    dataset: FeatureDataset,
    collator: Collator,
    batch_size: int,
    accelerator: Any | None = None,
    *,
    generate: bool = False,
    generate_limit: int | None = None,
) -> tuple[dict[str, torch.Tensor], float | None]:
    """Predictions for every feature of ``dataset`` (dataset order) and the mean loss.

    Evaluation and ``predict`` both come through here. A task made of sub-tasks
    (``Task.prediction_parts``) has each part predicted by its own task; the
    keys are then ``<task>/<key>`` plus ``<task>:positions`` and ``<task>:loss``,
    and the loss is the weighted sum of the parts' mean losses.
    """
    parts = task.prediction_parts(dataset)
    if parts is None:
        loader = make_eval_loader(task, dataset, collator, batch_size)
        if accelerator is not None:
            loader = accelerator.prepare_data_loader(loader)
        return predict_loader(
            model, task, loader, accelerator, generate=generate, generate_limit=generate_limit
        )
    preds: dict[str, torch.Tensor] = {}
    total: float | None = None
    for name, part_task, positions, weight in parts:
        part, loss = predict_dataset(
            part_task,
            model,
            FeatureDataset([dataset.features[i] for i in positions]),
            collator,
            batch_size,
            accelerator,
            generate=generate,
            generate_limit=generate_limit,
        )
        preds |= {f"{name}/{key}": value for key, value in part.items()}
        preds[f"{name}:positions"] = torch.tensor(positions)
        if loss is not None:
            preds[f"{name}:loss"] = torch.tensor(loss, dtype=torch.float64)
            total = (total or 0.0) + weight * loss
    return preds, total


def evaluate_dataset(
    model: torch.nn.Module,
    task: Task,
    dataset: FeatureDataset,
    collator: Collator,
    labels: Sequence[str],
    batch_size: int,
    accelerator: Any | None = None,
    *,
    generate: bool = False,
    generate_limit: int | None = None,
    calibrate: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Task metrics plus ``loss`` on a labelled data set, and the raw predictions.

    ``calibrate`` (the validation split of training only) lets the task fit
    what it tunes on validation first (``Task.calibrate``: multi-label
    thresholds), so the metrics are those of the fitted state.

    ``generate`` adds the metrics of generated text (BLEU, chrF) for generative
    tasks, computed on the first ``generate_limit`` items when it is set
    (``generate.eval_samples``: generation costs far more than the loss).
    """
    preds, loss = predict_dataset(
        task,
        model,
        dataset,
        collator,
        batch_size,
        accelerator,
        generate=generate,
        generate_limit=generate_limit,
    )
    if calibrate:
        task.calibrate(preds, labels)
    metrics = task.compute_metrics(preds, labels)
    if loss is not None:
        metrics = {"loss": loss, **metrics}
    return metrics, preds


def _cat(values: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the batch dim, padding ragged trailing dims with -100."""
    if values[0].ndim < 2 or len({v.shape[1:] for v in values}) == 1:
        return torch.cat(values)
    shape = [max(v.shape[d] for v in values) for d in range(1, values[0].ndim)]
    padded = []
    for v in values:
        pad = torch.full((v.shape[0], *shape), -100, dtype=v.dtype)
        pad[(slice(None), *(slice(0, n) for n in v.shape[1:]))] = v
        padded.append(pad)
    return torch.cat(padded)


def _pad_for_gather(preds: dict[str, torch.Tensor], accelerator: Any) -> dict[str, torch.Tensor]:
    """Sequence outputs differ in length across processes; pad before gathering.

    The ragged dimension is the last (tokens); generated ids also carry a fixed
    ``returns`` dimension before it.
    """
    return {
        k: accelerator.pad_across_processes(v, dim=v.ndim - 1, pad_index=-100) if v.ndim >= 2 else v
        for k, v in preds.items()
    }


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
