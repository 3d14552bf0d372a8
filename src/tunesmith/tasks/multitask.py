"""Multi-task training: one shared encoder, a private head per task, each task its own data.

Every task of ``multitask.tasks`` is built as the single-task ``Task`` it
names, from a config that is the run's with that task's ``task.type`` and
``data`` (``sub_config``); reading, encoding, the loss, the metrics and the
prediction format are theirs, unchanged. This class routes between them:

* records and features carry their task (``task``, ``task_id``); label ids
  live in one flat list of ``<task>/<label>`` names, which the manifest stores;
* training batches hold one task each (``data/task_sampler.py`` decides which
  task gets how many, per ``multitask.sampling``);
* the loss of a batch is ``weight_t * (mean loss over its targets)`` and
  ``count_targets`` is 1 per batch, so the loop's normaliser (targets of the
  accumulation window) becomes the number of micro-batches and a step
  minimises the mean of ``weight_t * mean loss_t`` over its batches: in
  expectation the weighted sum ``sum_t p_t w_t L_t`` of per-task mean losses,
  with ``p_t`` the task's mixing rate. Summing over targets instead would let
  the task with the most targets per example (tokens, for NER) dominate;
* evaluation runs each task on its own rows and reports ``<task>/<metric>``,
  ``<task>/loss``, ``loss`` (the weighted sum of the tasks' mean losses) and
  ``average``, the mean of each task's headline metric (accuracy, entity_f1),
  which is the default ``eval.metric`` for early stopping and ``best/``;
* ``predict`` runs every text through every head: one row per text with a
  key per task holding that task's usual prediction.

Saving writes ``encoder/`` once (a transformers folder; for adapter methods
the adapter alone) and ``heads/<task>.safetensors`` (``multitask_model.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tunesmith.config.multitask import sub_config
from tunesmith.config.root import Config
from tunesmith.config.task_specs import MultiTaskSpec
from tunesmith.data.task_sampler import TaskBatchSampler, mixing_rates
from tunesmith.errors import ConfigError, DataError, ModelError
from tunesmith.models.loading import load_pretrained
from tunesmith.tasks.base import TASKS, Batch, DataSplits, Feature, Task, register_task
from tunesmith.tasks.multitask_model import (
    ENCODER_DIR,
    MultiTaskModel,
    build_heads,
    build_task_adapters,
    save_adapter_encoder,
    unwrap,
)

log = logging.getLogger(__name__)


def split_labels(labels: Sequence[str], names: Sequence[str]) -> dict[str, list[str]]:
    """``<task>/<label>`` names (id order) -> each task's label list, in the same order."""
    per: dict[str, list[str]] = {name: [] for name in names}
    for qualified in labels:
        name, _, label = qualified.partition("/")
        if name not in per:
            raise DataError(f"label {qualified!r} names no task of this model ({', '.join(names)})")
        per[name].append(label)
    return per


@register_task
class MultiTask(MultiTaskSpec, Task):
    """Several classification / token-classification tasks on one shared encoder."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        tasks = cfg.multitask.tasks
        self.names = list(tasks)
        self.subtasks = {n: TASKS.get(tasks[n].type)(sub_config(cfg, n)) for n in self.names}
        self.weights = [tasks[n].weight for n in self.names]
        self.headline = {n: t.default_metric(t.cfg) for n, t in self.subtasks.items()}
        self.metric_names = (
            "average",
            *(
                f"{n}/{m}"
                for n, task in self.subtasks.items()
                for m in ("loss", *task.metric_names)
            ),
        )

    # -- data ---------------------------------------------------------------------
    def load_splits(self) -> DataSplits:
        """Each task's splits, its records tagged with the task, its labels qualified."""
        parts: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
        labels: list[str] = []
        tasks: dict[str, Any] = {}
        notes: list[str] = []
        for name, task in self.subtasks.items():
            splits = task.load_splits()
            for split, records in parts.items():
                records.extend({**r, "task": name} for r in getattr(splits, split))
            labels.extend(f"{name}/{label}" for label in splits.labels)
            tasks[name] = splits.provenance
            notes.extend(f"{name}: {note}" for note in splits.notes)
            notes.append(
                f"{name}: {len(splits.train)} train, {len(splits.validation)} validation, "
                f"{len(splits.test)} test rows ({task.name}, loss weight "
                f"{self.weights[self.names.index(name)]:g})"
            )
        provenance = {"seed": self.cfg.train.seed, "tasks": tasks}
        return DataSplits(
            parts["train"], parts["validation"], parts["test"], labels, provenance, notes
        )

    def load_records(
        self, path: str, *, labelled: bool = True, dropped: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Unlabelled input read as every task reads it (one record serves all heads).

        Raises:
            DataError: For labelled files: a file belongs to one task, so a
                multi-task model is evaluated on its run's splits instead.
        """
        if labelled:
            raise DataError(
                f"{path}: a multi-task model is evaluated on its run's splits (--split "
                "validation|test), whose rows know their task; a labelled file has no task"
            )
        return _merge([task.load_records(path, labelled=False) for task in self.subtasks.values()])

    def split_records(
        self, provenance: Mapping[str, Any], split: str, where: Any
    ) -> list[dict[str, Any]]:
        """Each task's rows of ``split`` (tasks without that split add none)."""
        tasks = provenance.get("tasks") if isinstance(provenance, Mapping) else None
        if not isinstance(tasks, Mapping):
            raise DataError(f"{where}: not the splits of a multi-task run")
        records = []
        for name, task in self.subtasks.items():
            own = tasks.get(name)
            if isinstance(own, Mapping) and own.get("rows", {}).get(split):
                found = task.split_records(own, split, where)
                records.extend({**r, "task": name} for r in found)
        if not records:
            raise DataError(f"{where}: the run has no '{split}' split")
        return records

    def text_records(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        return _merge([task.text_records(texts) for task in self.subtasks.values()])

    def check_labels(
        self, records: Sequence[Mapping[str, Any]], label2id: Mapping[str, int], split: str
    ) -> None:
        per = self._label_maps(label2id)
        for name, task in self.subtasks.items():
            mine = [r for r in records if r.get("task") == name]
            if mine:
                task.check_labels(mine, per[name] or {}, split)

    def encode(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        label2id: Mapping[str, int] | None,
    ) -> list[Feature]:
        """Each record by its task's encoder; records without a task by every task's.

        Prediction input has no task: it is encoded once per task (all records
        for the first task, then for the second, ...), so every head sees it.
        """
        per = self._label_maps(label2id)
        tagged = [r for r in records if "task" in r]
        if not tagged:
            return [
                {**feature, "task_id": t}
                for t, name in enumerate(self.names)
                for feature in self.subtasks[name].encode(records, tokenizer, per[name])
            ]
        if len(tagged) != len(records):
            raise DataError("records mix rows with and without a task")
        features: list[Feature] = [{} for _ in records]
        for t, name in enumerate(self.names):
            positions = [i for i, r in enumerate(records) if r["task"] == name]
            if not positions:
                continue
            encoded = self.subtasks[name].encode(
                [records[i] for i in positions], tokenizer, per[name]
            )
            for i, feature in zip(positions, encoded, strict=True):
                features[i] = {**feature, "task_id": t}
        return features

    def train_sampler(
        self, features: Sequence[Feature], batch_size: int, *, group_by_length: bool, seed: int
    ) -> TaskBatchSampler:
        """Single-task batches at the configured mixing rates (``data/task_sampler.py``)."""
        mt = self.cfg.multitask
        task_ids = [int(f["task_id"]) for f in features]
        sizes = [task_ids.count(t) for t in range(len(self.names))]
        sampler = TaskBatchSampler(
            task_ids,
            [self.feature_length(f) for f in features],
            batch_size,
            rates=mixing_rates(sizes, mt.sampling, mt.temperature),
            group_by_length=group_by_length,
            seed=seed,
        )
        shares = zip(self.names, sizes, sampler.quotas, sampler.rates, strict=True)
        log.info(
            "task sampling (%s): %s batches per epoch: %s",
            mt.sampling,
            sampler.batches_per_epoch,
            ", ".join(f"{n} {q} ({r:.1%}; {size} examples)" for n, size, q, r in shares),
        )
        return sampler

    # -- model --------------------------------------------------------------------
    def auto_class(self) -> Any:
        from transformers import AutoModel

        return AutoModel

    def build_model(self, labels: Sequence[str], tokenizer: Any) -> MultiTaskModel:
        return self._assemble(self._load_encoder(self.cfg.model.name_or_path), labels)

    def load_saved(self, path: str, labels: Sequence[str], tokenizer: Any, method: Any) -> Any:
        """``encoder/`` (a model, or an adapter on the configured base) plus every head."""
        folder = Path(path)
        if method.saves_adapter:
            model = method.load_saved(self.build_model(labels, tokenizer), folder / ENCODER_DIR)
        else:
            model = self._assemble(self._load_encoder(str(folder / ENCODER_DIR)), labels)
        unwrap(model).load_heads(folder)
        return model.eval()

    def save_weights(self, method: Any, model: Any, folder: Any, weights: Any = None) -> None:
        """The encoder once (a transformers folder, or the adapter alone) plus each head."""
        if weights is not None:  # sharded training refuses multi-task runs before they start
            raise ModelError("a multi-task model is saved from its own (unsharded) weights")
        if not method.saves_adapter:
            unwrap(model).save_pretrained(folder)
            return
        unwrap(model).save_heads(folder)
        save_adapter_encoder(method, model, Path(folder) / ENCODER_DIR)

    def _load_encoder(self, path: str) -> Any:

        m = self.cfg.model
        return load_pretrained(
            self.auto_class(),
            path,
            trust_remote_code=m.trust_remote_code,
            allow_unsafe_weights=m.allow_unsafe_weights,
        )

    def _assemble(self, encoder: Any, labels: Sequence[str]) -> MultiTaskModel:
        per = split_labels(labels, self.names)
        types = {name: task.name for name, task in self.subtasks.items()}
        heads = build_heads(encoder, per, types)
        mt = self.cfg.multitask
        if not mt.task_adapters:
            return MultiTaskModel(encoder, heads, per, types)
        paths = [p.removeprefix("encoder.") for p in self.cfg.method.blocks or ()] or None
        try:
            adapters, blocks = build_task_adapters(
                encoder, self.names, mt.adapter_reduction, mt.adapter_activation, paths
            )
        except ValueError as err:
            raise ConfigError(f"multitask.adapter_reduction: {err}") from None
        return MultiTaskModel(encoder, heads, per, types, adapters, blocks)

    # -- loss and outputs -----------------------------------------------------------
    def model_inputs(self, batch: Batch) -> Batch:
        return self._task_of(batch)[1].model_inputs(batch)

    def count_targets(self, batch: Batch) -> torch.Tensor:
        """1 per batch: ``loss_sum`` is already a mean over the batch's targets."""
        return torch.ones((), dtype=torch.long, device=batch["task_id"].device)

    def loss_sum(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """``weight_t`` times the batch's mean loss over its targets (see the module doc)."""
        t, task = self._task_of(batch)
        return self.weights[t] * task.loss_sum(outputs, batch) / task.count_targets(batch).clamp(1)

    def outputs_to_predictions(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        return self._task_of(batch)[1].outputs_to_predictions(outputs, batch)

    def prediction_parts(self, dataset: Any) -> list[tuple[str, Task, list[int], float]]:
        """Each task's features through its own head (``tasks.inference`` joins them).

        Keys become ``<task>/<key>``; ``<task>:loss`` holds the task's mean loss and
        ``<task>:positions`` where its features sit in ``dataset``; the loss is the
        weighted sum of the tasks' mean losses.
        """
        parts = []
        for t, name in enumerate(self.names):
            positions = [i for i, f in enumerate(dataset.features) if f["task_id"] == t]
            if positions:
                parts.append((name, self.subtasks[name], positions, self.weights[t]))
        return parts

    def compute_metrics(
        self, predictions: Mapping[str, torch.Tensor], labels: Sequence[str]
    ) -> dict[str, Any]:
        per = split_labels(labels, self.names)
        metrics: dict[str, Any] = {}
        headlines = []
        for name, task in self.subtasks.items():
            if f"{name}:positions" not in predictions:
                continue
            own = task.compute_metrics(_of(predictions, name), per[name])
            if f"{name}:loss" in predictions:
                own = {"loss": float(predictions[f"{name}:loss"]), **own}
            metrics |= {f"{name}/{key}": value for key, value in own.items()}
            headlines.append(own[self.headline[name]])
        average = sum(headlines) / len(headlines) if headlines else 0.0
        return {"average": average, **metrics}

    def format_predictions(
        self,
        predictions: Mapping[str, torch.Tensor],
        labels: Sequence[str],
        records: Sequence[Mapping[str, Any]],
    ) -> list[dict[str, Any]]:
        """One row per record: ``{<task>: that task's prediction}`` for every task."""
        per = split_labels(labels, self.names)
        rows: list[dict[str, Any]] = [{} for _ in records]
        for name, task in self.subtasks.items():
            if f"{name}:positions" in predictions:
                found = task.format_predictions(_of(predictions, name), per[name], records)
                for row, item in zip(rows, found, strict=True):
                    row[name] = item
        return rows

    # -- helpers ------------------------------------------------------------------
    def _task_of(self, batch: Batch) -> tuple[int, Task]:
        t = int(batch["task_id"].reshape(-1)[0])
        return t, self.subtasks[self.names[t]]

    def _label_maps(self, label2id: Mapping[str, int] | None) -> dict[str, dict[str, int] | None]:
        """Each task's ``label -> id`` from the qualified map (None stays None)."""
        if label2id is None:
            return dict.fromkeys(self.names)
        per = split_labels(sorted(label2id, key=label2id.__getitem__), self.names)
        return {name: {lab: i for i, lab in enumerate(labs)} for name, labs in per.items()}


def _of(predictions: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Task ``name``'s own prediction tensors, keys without the ``<task>/`` prefix."""
    prefix = f"{name}/"
    return {k[len(prefix) :]: v for k, v in predictions.items() if k.startswith(prefix)}


def _merge(per_task: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One record per input row holding what every task read from it."""
    counts = {len(records) for records in per_task}
    if len(counts) > 1:
        raise DataError(
            f"the tasks read different numbers of rows from the input ({sorted(counts)}); "
            "give a file every task reads alike (a text column)"
        )
    rows = zip(*per_task, strict=True)
    return [{k: v for record in row for k, v in record.items()} for row in rows]
