"""The multi-label and regression heads of sequence classification (``task.problem_type``).

Same encoder, pooler and data pipeline as single-label classification; what
changes is the target and everything that reads it:

* multi-label: a row's target is a set of labels, a multi-hot vector; the
  loss is binary cross-entropy per label (a sigmoid each), and a label is
  predicted when its probability reaches the label's threshold. Thresholds
  are tuned per label on the validation split (``calibrate``, called by the
  loop's validation only), saved with the checkpoint (``fitted_state``) and
  reused as they are on test and in ``predict``.
* regression: a row's target is one number per target column; the loss is
  MSE or Huber, the output the raw values.

Both sum the loss over every (row, output) value and count them as targets,
so gradient accumulation stays exact. The mixin keeps these apart from the
single-label code in ``classification.py``, which calls in here by problem type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.data.labels import sort_labels
from tunesmith.data.targets import (
    TargetReader,
    check_label_sets,
    keep_listed,
    label_set_reader,
    number_reader,
)
from tunesmith.tasks.head_metrics import multi_label_metrics, regression_metrics, tune_thresholds

#: transformers' ``config.problem_type`` names, so a saved folder describes its head.
HF_PROBLEM_TYPES = {
    "single_label": "single_label_classification",
    "multi_label": "multi_label_classification",
    "regression": "regression",
}


class ProblemHeads:
    """Mixin for ``SequenceClassification``: what differs for multi-label and regression."""

    cfg: Any
    #: Multi-label: per-label thresholds, tuned on validation (None: 0.5 each).
    thresholds: list[float] | None = None

    @property
    def problem_type(self) -> str:
        """``task.problem_type``: single_label, multi_label or regression."""
        return self.cfg.task.problem_type

    # -- data ---------------------------------------------------------------
    def target_reader(self) -> TargetReader | None:
        """How rows' targets are read (None: the single label of ``data.label_column``)."""
        d = self.cfg.data
        if self.problem_type == "multi_label":
            return label_set_reader(d.label_column, d.label_delimiter)
        if self.problem_type == "regression":
            return number_reader(d.label_columns or [d.label_column])
        return None

    def head_labels(self, parts: Mapping[str, list[dict[str, Any]]], notes: list[str]) -> list[str]:
        """The outputs' names: the label set (multi-label) or the target columns (regression).

        Multi-label: ``data.labels`` (unlisted labels removed from every row), else
        every label of the data files. A rare label may miss the training rows (a
        capped or small training split); it keeps its output, scored as never
        predicted, and a note says so, where failing would lose the run.
        """
        d = self.cfg.data
        if self.problem_type == "regression":
            return list(d.label_columns or [d.label_column])
        if d.labels:
            for split, records in parts.items():
                removed = keep_listed(records, d.labels)
                if removed:
                    counts = ", ".join(f"{lab}: {n}" for lab, n in sorted(removed.items()))
                    notes.append(f"{split}: removed labels not in data.labels ({counts})")
            return list(d.labels)
        trained = {lab for r in parts["train"] for lab in r["targets"]}
        labels = sort_labels(lab for rows in parts.values() for r in rows for lab in r["targets"])
        missing = [lab for lab in labels if lab not in trained]
        if missing:
            notes.append(f"train: no row has label {', '.join(missing)} (held-out rows do)")
        return labels

    def check_head_labels(
        self, records: Sequence[Mapping[str, Any]], label2id: Mapping[str, int], split: str
    ) -> None:
        """Multi-label: every label of ``split`` was trained on; regression has nothing to check."""
        if self.problem_type == "multi_label":
            check_label_sets(records, label2id, split)

    def head_target(self, record: Mapping[str, Any], label2id: Mapping[str, int]) -> list[float]:
        """A record's target vector: multi-hot (multi-label) or its numbers (regression)."""
        if self.problem_type == "regression":
            return [float(v) for v in record["targets"]]
        hot = [0.0] * len(label2id)
        for lab in record["targets"]:
            if lab in label2id:
                hot[label2id[lab]] = 1.0
        return hot

    # -- loss ---------------------------------------------------------------
    def head_loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed BCE (multi-label) or MSE / Huber (regression) over every output value."""
        logits, labels = logits.float(), labels.to(torch.float32).reshape(logits.shape)
        if self.problem_type == "multi_label":
            return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        loss = self.cfg.loss
        if loss.type == "huber":
            return F.huber_loss(logits, labels, reduction="sum", delta=loss.huber_delta)
        return F.mse_loss(logits, labels, reduction="sum")

    # -- validation-fitted state --------------------------------------------
    def calibrate(self, predictions: Mapping[str, torch.Tensor], labels: Sequence[str]) -> None:
        """Multi-label: tune each label's threshold on these (validation) predictions."""
        if self.problem_type == "multi_label" and len(predictions.get("labels", ())):
            probs = predictions["logits"].sigmoid().numpy()
            self.thresholds = tune_thresholds(probs, predictions["labels"].numpy())

    def fitted_state(self) -> dict[str, Any]:
        """What ``calibrate`` learned, saved in the checkpoint's manifest."""
        return {"thresholds": self.thresholds} if self.thresholds is not None else {}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Take back what ``fitted_state`` saved (evaluate, predict)."""
        self.thresholds = state.get("thresholds")

    def label_thresholds(self, count: int) -> list[float]:
        """The thresholds in use: the tuned ones, else 0.5 for each of ``count`` labels."""
        return list(self.thresholds) if self.thresholds is not None else [0.5] * count

    # -- outputs ------------------------------------------------------------
    def head_metrics(
        self, predictions: Mapping[str, torch.Tensor], labels: Sequence[str]
    ) -> dict[str, Any]:
        """Multi-label F1 at the current thresholds, or the regression metrics."""
        logits, refs = predictions["logits"], predictions["labels"].float().numpy()
        if self.problem_type == "regression":
            return regression_metrics(logits.numpy(), refs, labels)
        probs = logits.sigmoid().numpy()
        return multi_label_metrics(probs, refs, labels, self.label_thresholds(len(labels)))

    def head_predictions(
        self, predictions: Mapping[str, torch.Tensor], labels: Sequence[str]
    ) -> list[dict[str, Any]]:
        """Regression: every target's value; multi-label: the labels and every probability."""
        logits = predictions["logits"]
        if self.problem_type == "regression":
            return [
                {"values": {t: round(v, 6) for t, v in zip(labels, row, strict=True)}}
                for row in logits.tolist()
            ]
        cuts = self.label_thresholds(len(labels))
        out = []
        for row in logits.sigmoid().tolist():
            out.append(
                {
                    "labels": [lab for lab, p, t in zip(labels, row, cuts, strict=True) if p >= t],
                    "probabilities": {lab: round(p, 6) for lab, p in zip(labels, row, strict=True)},
                }
            )
        return out
