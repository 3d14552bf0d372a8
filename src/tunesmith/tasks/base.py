"""The Task interface and its registry.

A task owns everything that depends on *what* is learned: which records it
reads, how they are tokenised, which head the model gets, how a batch turns
into a loss and how outputs become predictions and metrics. The training loop
only ever talks to this interface, so adding a task is one module plus one
``@register_task`` line, never an ``if task == ...`` inside the loop. What
config validation needs of a task (name, metrics, capabilities, checks) is its
torch-free spec (``config/task_specs.py``), registered apart; the task class
inherits from it, and each task registered here has a spec of the same name.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tunesmith.config.specs import TaskSpec
from tunesmith.core.registry import Registry
from tunesmith.data.batching import EpochSampler
from tunesmith.data.cleaning import EMPTY, normalize_record
from tunesmith.data.labels import check_labels
from tunesmith.data.pipeline import assemble_splits, select_by_source
from tunesmith.errors import DataError
from tunesmith.models.adapter_start import load_merged
from tunesmith.models.dropout import configured_dropout
from tunesmith.models.loading import adapter_base, load_pretrained
from tunesmith.tasks.encoding import effective_limit, full_lengths
from tunesmith.tasks.grouping import choose_window

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunesmith.config.root import Config
    from tunesmith.data.cleaning import CleaningReport, FileReport
    from tunesmith.tasks.truncation import TruncationReport

log = logging.getLogger(__name__)

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
        quality: What cleaning removed per file and reason, leakage and label
            counts (``data/cleaning.py``); None for multi-task runs, whose
            tasks each have theirs (in ``provenance``).
    """

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    labels: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    quality: CleaningReport | None = None


class Task(TaskSpec, ABC):
    """What a task must provide to the shared data pipeline and training loop.

    Its name, metrics, capability flags and config checks come from its spec
    (``config/task_specs.py``), which each task inherits first:
    ``class CausalLM(CausalLMSpec, Task)``.
    """

    #: Per-class loss weights of this run (``loss.class_weights``), resolved from the
    #: training labels by ``build_run_parts`` and restored from the checkpoint manifest.
    class_weights: list[float] | None = None

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

    def read_dropping_empty(
        self, path: str, notes: list[str], what: str, report: FileReport | None = None
    ) -> list[dict[str, Any]]:
        """Read ``path``; rows lacking what the task needs are dropped and noted, or fail.

        ``data.empty_rows: drop`` (the default) drops them, adds a note naming
        the first (``what`` says what they lack) and counts them in ``report``
        (the file's cleaning report); ``error`` fails on it.
        """

        empty: list[str] | None = [] if self.cfg.data.empty_rows == "drop" else None
        records = self.load_records(path, dropped=empty)
        if empty:
            if report is not None:
                report.drop(EMPTY, empty)
            notes.append(
                f"{path}: dropped {len(empty)} rows {what} (first: {empty[0]}; "
                "set data.empty_rows=error to fail instead)"
            )
        return records

    def split_free_text(self, what: str) -> DataSplits:
        """Read and split the configured files for a task without a label vocabulary.

        Rows lacking what the task needs are dropped (``what`` says what they
        lack, for the note); the splits are random (chat data: grouped by first
        question, ``data/pipeline.py``).
        """
        notes: list[str] = []
        parts, provenance, split_notes, quality = assemble_splits(
            self.cfg.data,
            self.cfg.train.seed,
            lambda path, report: self.read_dropping_empty(path, notes, what, report),
        )
        return DataSplits(
            **parts, provenance=provenance, notes=notes + split_notes, quality=quality
        )

    def split_records(
        self, provenance: Mapping[str, Any], split: str, where: Any
    ) -> list[dict[str, Any]]:
        """The records of ``split`` of a finished run, from its ``splits.json`` (``where``).

        Re-reads the run's files and keeps the rows listed for that split,
        normalised as training read them (``data.clean.normalize``).

        Raises:
            DataError: The provenance is unreadable, lacks the split, or a file is gone.
        """
        import os

        try:
            rows, files = provenance["rows"], list(provenance["files"].values())
        except (KeyError, TypeError, AttributeError) as err:
            raise DataError(f"{where}: unreadable ({err}); give the data file instead") from None
        if split not in rows or not rows[split]:
            raise DataError(f"{where}: the run has no '{split}' split")
        files = [p for p in files if p]
        missing = [p for p in files if not os.path.exists(p)]
        if missing:
            raise DataError(f"data file of the run not found: {missing[0]}")
        pool = [r for p in files for r in self.load_records(p, dropped=[])]
        records = select_by_source(pool, rows[split])
        if self.cfg.data.clean.normalize:
            # Rows that normalise to nothing were dropped in training, so are not listed.
            records = [normalize_record(r) or r for r in records]
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

        check_labels(records, label2id, split)

    def token_lengths(
        self, records: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase
    ) -> dict[str, tuple[list[int], int]]:
        """Each record's token count before truncation and the limit ``encode`` cuts at.

        Keyed by what is measured (``input``; seq2seq adds ``target``), so
        ``data inspect`` can count the rows ``data.max_length`` cuts and the
        tokens lost. This default measures ``text`` (and ``text_pair``).
        """

        texts = [r["text"] for r in records]
        pairs = [r["text_pair"] for r in records] if records and "text_pair" in records[0] else None
        limit = effective_limit(tokenizer, self.cfg.data.max_length)
        return {"input": (full_lengths(tokenizer, texts, pairs), limit)}

    def pack_training(
        self, features: list[Feature], tokenizer: PreTrainedTokenizerBase
    ) -> list[Feature]:
        """The training features as batches will take them; tasks that pack rows override it.

        Called on the training split only: evaluation scores one example per row.
        """
        return features

    def truncation(
        self, records: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase
    ) -> TruncationReport | None:
        """What the length limits cut off the answers of ``records`` (generative tasks).

        Computed from the tokenizer alone, so a run can refuse cut data before
        the model loads (``tasks/truncation.py``). Tasks without free-text
        answers (classification, tagging) return None: nothing is gated.
        """
        return None

    def feature_length(self, feature: Feature) -> int:
        """Length used for length-grouped batching."""
        return len(feature["input_ids"])

    # -- model --------------------------------------------------------------
    @abstractmethod
    def auto_class(self) -> Any:
        """The transformers ``AutoModelFor*`` class of this task's models."""

    def load_saved(
        self, path: str, labels: Sequence[str], tokenizer: PreTrainedTokenizerBase, method: Any
    ) -> PreTrainedModel:
        """Load a folder this task saved (``best/``, ``final/``) in its own layout.

        Adapter checkpoints hold only adapter and head weights: the base model
        named in the config is built first and ``method`` (the run's method, which
        knows its files) puts them back. Exported formats (int8, pruned) are
        recognised before this is called (``runs.load``).
        """
        if method.saves_adapter:
            return method.load_saved(self.build_model(labels, tokenizer), Path(path))
        return load_pretrained(
            self.auto_class(),
            path,
            trust_remote_code=self.cfg.model.trust_remote_code,
            allow_unsafe_weights=self.cfg.model.allow_unsafe_weights,
        )

    def loaded(self, model: Any, tokenizer: PreTrainedTokenizerBase, path: str) -> None:
        """Called with every model loaded from ``path``; tasks that keep facts of it note them."""
        return None

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
        return self.load_configured(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={lab: i for i, lab in enumerate(labels)},
            # A checkpoint of another task (other label count) starts this one: its
            # head is re-initialised; any other shape mismatch is still an error.
            ignore_mismatched_sizes=True,
        )

    def load_configured(self, **config_changes: Any) -> PreTrainedModel:
        """The configured model under ``auto_class`` with the config's permissions.

        ``config_changes`` go to ``from_pretrained`` (a new head's size and
        labels); generative tasks use the model's own head and pass none.
        """

        m = self.cfg.model
        # A folder holding an adapter (an SFT run's best/) starts from base + adapter merged.
        base = adapter_base(m.name_or_path)
        # regularize.*_dropout: model config keys, set before the modules are built.
        config_changes = {**configured_dropout(self.cfg, base or m.name_or_path), **config_changes}
        load = load_pretrained if base is None else load_merged
        return load(
            self.auto_class(),
            m.name_or_path,
            trust_remote_code=m.trust_remote_code,
            allow_unsafe_weights=m.allow_unsafe_weights,
            **config_changes,
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

    def generate_predictions(
        self, model: Any, batch: Batch, *, limit: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Generated text ids for the batch (generative tasks), merged into the predictions.

        Called by evaluation when ``generate.in_eval`` is on and always by
        ``predict``; ``model`` is unwrapped (it has ``generate``). Tasks that do
        not generate add nothing. Generative tasks keep the tokenizer given to
        ``encode`` to decode what they generate. With ``limit`` only items whose
        ``batch["index"]`` is below it are generated for (``generate.eval_samples``);
        the tensors still cover the whole batch (the others hold no tokens, -100),
        so every batch contributes the same keys.
        """
        return {}

    def scored(self, batch: Batch) -> bool:
        """Whether the batch carries targets, so evaluation computes its loss."""
        return "labels" in batch

    def model_inputs(self, batch: Batch) -> Batch:
        """The part of a batch that goes into ``model(**inputs)``."""
        return {k: v for k, v in batch.items() if k not in ("labels", "index")}

    def forward(self, model: torch.nn.Module, batch: Batch) -> Any:
        """The outputs ``loss_sum`` and ``outputs_to_predictions`` read, for one batch.

        The model's own outputs here; a task may skip what its loss does not
        read (the causal LM applies its head to the labelled positions only).
        """
        return model(**self.model_inputs(batch))

    # -- training statistics besides the loss (preference rewards) -----------
    def take_parts(self) -> dict[str, float]:
        """Sums noted by ``loss_sum`` since the last call, added up over a log window."""
        return {}

    def log_fields(self, parts: Mapping[str, float], targets: float) -> dict[str, float]:
        """The train log's fields from a window's summed ``take_parts`` and its targets."""
        return {}

    def progress_fields(self, record: Mapping[str, Any]) -> dict[str, str]:
        """Extra progress-bar fields from a train log record."""
        return {}

    def before_training(self, model: Any, datasets: Sequence[Any], batch_size: int) -> None:
        """Called once with the adapted, untrained model and the train/validation sets."""
        return None

    # -- online tasks (RL): batches made from the model's own samples ---------
    def rollout(self, model: Any, window: Sequence[Batch]) -> list[Batch]:
        """The batches one window of data becomes (RL: its prompts' scored completions).

        Other tasks train on the window itself.
        """
        return list(window)

    def updates_per_window(self) -> int:
        """Optimizer steps taken on each window's batches (RL: ``rl.iterations``)."""
        return 1

    def window_state(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint keeps so a resumed run continues the window (RL: rollouts)."""
        return {}

    def restore_window_state(self, tensors: Mapping[str, torch.Tensor]) -> list[Batch] | None:
        """Take back ``window_state``; the window's stored batches, if any."""
        return None

    def evaluation_samples(self) -> list[dict[str, Any]]:
        """Examples the last evaluation kept to show (RL: prompts, completions, rewards)."""
        return []

    # -- state fitted on validation (multi-label thresholds) -----------------
    def calibrate(self, predictions: Mapping[str, torch.Tensor], labels: Sequence[str]) -> None:
        """Fit what the task tunes on validation outputs before scoring them (nothing here).

        Called by the loop's validation only, never on test: multi-label
        classification picks each label's threshold here.
        """
        return None

    def fitted_state(self) -> dict[str, Any]:
        """What ``calibrate`` fitted, saved in the checkpoint manifest (``task_state``)."""
        return {}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Take back ``fitted_state`` when a checkpoint is loaded."""
        return None

    # -- loop hooks (multi-task overrides them; other tasks keep these) ------
    def train_sampler(
        self, features: Sequence[Feature], batch_size: int, *, group_by_length: bool, seed: int
    ) -> Any:
        """The training order: a sampler with ``set_epoch``, ``order()`` and ``lengths``.

        Its order must depend on the seed and the epoch alone: resuming skips
        the micro-batches of the interrupted epoch by re-creating its order.
        """

        lengths = [self.feature_length(f) for f in features]
        if not group_by_length:
            return EpochSampler(lengths, batch_size, group_by_length=False, seed=seed)
        choice = choose_window(
            lengths, self.grouping_labels(features), batch_size, self.cfg.data.length_window
        )
        log.log(logging.WARNING if choice.warn else logging.INFO, "%s", choice.message)
        return EpochSampler(lengths, batch_size, seed=seed, window=choice.window)

    def grouping_labels(self, features: Sequence[Feature]) -> list[int] | None:
        """The class of every training example, for length grouping's label check.

        None (here) skips the check: the task has no single class per example.
        Tasks that have one return it, so a run whose text length predicts the
        label gets smaller sorting windows or random batches (``tasks/grouping.py``).
        """
        return None

    def prediction_parts(self, dataset: Any) -> list[tuple[str, Task, list[int], float]] | None:
        """How a task made of sub-tasks splits a data set for prediction (None: it does not).

        Multi-task returns, per task present in ``dataset``: its name, its task,
        the positions of its features and its loss weight; ``tasks.inference``
        then predicts each part through its own head and joins them.
        """
        return None

    def save_weights(self, method: Any, model: Any, folder: Any, weights: Any = None) -> None:
        """Write the trained weights of ``model`` into ``folder`` (``best/``, ``final/``).

        The method decides by default (a transformers folder, or an adapter).
        ``weights``: the whole state, gathered, when ``model`` is sharded (FSDP).
        """
        method.save_weights(model, folder, weights)


TASKS: Registry[type[Task]] = Registry(
    "task.type",
    [
        "tunesmith.tasks.classification",
        "tunesmith.tasks.token_classification",
        "tunesmith.tasks.causal_lm",
        "tunesmith.tasks.preference",
        "tunesmith.tasks.reward_model",
        "tunesmith.tasks.rl",
        "tunesmith.tasks.seq2seq",
        "tunesmith.tasks.multitask",
    ],
)
#: Class decorator adding a task to the registry under ``cls.name``.
register_task = TASKS.register
#: Names of every registered task.
task_names = TASKS.names


def get_task(cfg: Config) -> Task:
    """Instantiate the task named by ``cfg.task.type``."""
    return TASKS.get(cfg.task.type)(cfg)
