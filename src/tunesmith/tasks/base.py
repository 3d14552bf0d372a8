"""The Task interface and its registry.

A task owns everything that depends on *what* is learned: which records it
reads, how they are tokenised, which head the model gets, how a batch turns
into a loss and how outputs become predictions and metrics. The training loop
only ever talks to this interface, so adding a task is one module plus one
``@register_task`` line, never an ``if task == ...`` inside the loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tunesmith.registry import Registry

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunesmith.config import Config

Feature = dict[str, Any]
Batch = dict[str, torch.Tensor]


@dataclass
class DataSplits:
    """Records of each split plus what was learned about the data on loading.

    Attributes:
        train: Training records.
        validation: Validation records (may be empty).
        test: Test records (may be empty).
        labels: The label vocabulary in id order (empty for label-free tasks).
        provenance: Which source rows went to which split (saved as splits.json).
        notes: Human-readable facts worth logging (dropped rows, splits made).
    """

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    labels: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Task(ABC):
    """What a task must provide to the shared data pipeline and training loop."""

    #: Registry name, as written in ``task.type``.
    name: str = ""
    #: Metric names this task reports (``eval.metric`` must be one of them or ``loss``).
    metric_names: tuple[str, ...] = ()
    #: ``peft.TaskType`` name for adapter methods.
    peft_task_type: str = "SEQ_CLS"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    # -- data ---------------------------------------------------------------
    @abstractmethod
    def load_splits(self) -> DataSplits:
        """Read, clean and split the configured data files."""

    @abstractmethod
    def load_records(
        self, path: str, *, labelled: bool = True, dropped: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Read one file with the configured column mapping (used by eval/predict)."""

    @abstractmethod
    def encode(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        label2id: Mapping[str, int] | None,
    ) -> list[Feature]:
        """Tokenise records into features (lists of ints), without padding."""

    def read_dropping_empty(self, path: str, notes: list[str], what: str) -> list[dict[str, Any]]:
        """Read ``path``; rows lacking what the task needs are dropped and noted, or fail.

        ``data.empty_rows: drop`` (the default) drops them and adds a note
        naming the first (``what`` says what they lack); ``error`` fails on it.
        """
        empty: list[str] | None = [] if self.cfg.data.empty_rows == "drop" else None
        records = self.load_records(path, dropped=empty)
        if empty:
            notes.append(
                f"{path}: dropped {len(empty)} rows {what} (first: {empty[0]}; "
                "set data.empty_rows=error to fail instead)"
            )
        return records

    def text_records(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Prediction records for raw texts (``predict --text``); ``text`` is echoed back."""
        return [{"text": t, "source": f"text {i}"} for i, t in enumerate(texts)]

    def check_labels(
        self, records: Sequence[Mapping[str, Any]], label2id: Mapping[str, int], split: str
    ) -> None:
        """Fail with the first row whose label the model was not trained on.

        Raises:
            DataError: Naming that row, its label and the training labels.
        """
        from tunesmith.data.labels import check_labels

        check_labels(records, label2id, split)

    def feature_length(self, feature: Feature) -> int:
        """Length used for length-grouped batching."""
        return len(feature["input_ids"])

    # -- model --------------------------------------------------------------
    @abstractmethod
    def auto_class(self) -> Any:
        """The transformers ``AutoModelFor*`` class of this task's models."""

    def load_trained(
        self, path: str, labels: Sequence[str], tokenizer: PreTrainedTokenizerBase
    ) -> PreTrainedModel:
        """Load a folder this task saved (``best/``, ``final/``) for eval or predict.

        Adapter checkpoints hold only adapter and head weights: the base model
        named in the config is built first and the method puts them back.
        """
        from pathlib import Path

        from tunesmith.methods.base import METHODS
        from tunesmith.modeling import load_pretrained

        method = METHODS.get(self.cfg.method.name)
        if method.saves_adapter:
            return method.load_saved(self.build_model(labels, tokenizer), Path(path))
        return load_pretrained(
            self.auto_class(),
            path,
            trust_remote_code=self.cfg.model.trust_remote_code,
            allow_unsafe_weights=self.cfg.model.allow_unsafe_weights,
        )

    @abstractmethod
    def build_model(
        self, labels: Sequence[str], tokenizer: PreTrainedTokenizerBase
    ) -> PreTrainedModel:
        """Load the configured base model with this task's head."""

    def load_with_head(self, labels: Sequence[str]) -> PreTrainedModel:
        """The configured base model under ``auto_class`` with a new head for ``labels``.

        The label names go into the model's config (``id2label``), so a saved
        folder is self-describing for other tools too.
        """
        from tunesmith.modeling import load_pretrained

        m = self.cfg.model
        return load_pretrained(
            self.auto_class(),
            m.name_or_path,
            trust_remote_code=m.trust_remote_code,
            allow_unsafe_weights=m.allow_unsafe_weights,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={lab: i for i, lab in enumerate(labels)},
        )

    # -- loss and outputs ---------------------------------------------------
    def count_targets(self, batch: Batch) -> torch.Tensor:
        """Number of supervised targets in a batch (the loss normaliser).

        Gradient accumulation divides the summed loss by the targets of the
        whole accumulated batch, not per micro-batch (see transformers #24725).
        """
        return (batch["labels"] != -100).sum()

    @abstractmethod
    def loss_sum(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """The *summed* (not averaged) loss over the batch's targets."""

    @abstractmethod
    def outputs_to_predictions(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        """Tensors (first dim = batch) that ``compute_metrics``/``format_predictions`` read."""

    @abstractmethod
    def compute_metrics(
        self, predictions: Mapping[str, torch.Tensor], labels: Sequence[str]
    ) -> dict[str, Any]:
        """Metrics from the concatenated predictions of a whole split."""

    @abstractmethod
    def format_predictions(
        self,
        predictions: Mapping[str, torch.Tensor],
        labels: Sequence[str],
        records: Sequence[Mapping[str, Any]],
    ) -> list[dict[str, Any]]:
        """One JSON-able dict per example, for ``tunesmith predict``.

        ``records`` are the encoded records, in the same order, for tasks whose
        output refers back to the input (entity spans as character offsets).
        """

    def generate_predictions(self, model: Any, batch: Batch) -> dict[str, torch.Tensor]:
        """Generated text ids for the batch (generative tasks), merged into the predictions.

        Called by evaluation when ``generate.in_eval`` is on and always by
        ``predict``; ``model`` is unwrapped (it has ``generate``). Tasks that do
        not generate add nothing. Generative tasks keep the tokenizer given to
        ``encode`` to decode what they generate.
        """
        return {}

    def model_inputs(self, batch: Batch) -> Batch:
        """The part of a batch that goes into ``model(**inputs)``."""
        return {k: v for k, v in batch.items() if k not in ("labels", "index")}


TASKS: Registry[type[Task]] = Registry(
    "task.type", ["tunesmith.tasks.classification", "tunesmith.tasks.token_classification"]
)
#: Class decorator adding a task to the registry under ``cls.name``.
register_task = TASKS.register
#: Names of every registered task.
task_names = TASKS.names


def get_task(cfg: Config) -> Task:
    """Instantiate the task named by ``cfg.task.type``."""
    return TASKS.get(cfg.task.type)(cfg)
