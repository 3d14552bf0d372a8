"""Sequence classification: single texts or text pairs, one label each (or several, or numbers).

``task.problem_type`` picks the head: single-label here; multi-label and
regression in ``heads.py``, which this class mixes in and calls by problem type.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tunesmith.config.heads import METRICS_BY_PROBLEM
from tunesmith.config.task_specs import SequenceClassificationSpec
from tunesmith.data.cleaning import LABEL_NOT_LISTED, FileReport
from tunesmith.data.labels import build_label_list, check_labels
from tunesmith.data.loading import filter_labels, load_records
from tunesmith.data.pipeline import assemble_splits
from tunesmith.tasks.base import Batch, DataSplits, Feature, Task, register_task
from tunesmith.tasks.class_loss import ClassLoss
from tunesmith.tasks.encoding import chunks, position_cut
from tunesmith.tasks.heads import HF_PROBLEM_TYPES, ProblemHeads
from tunesmith.tasks.metrics import classification_metrics

log = logging.getLogger(__name__)


@register_task
class SequenceClassification(SequenceClassificationSpec, ProblemHeads, ClassLoss, Task):
    """One label per text (or text pair) with a linear head on the pooled encoder."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.metric_names = METRICS_BY_PROBLEM[self.problem_type]

    # -- data ---------------------------------------------------------------
    def load_records(
        self, path: str, *, labelled: bool = True, dropped: list[str] | None = None
    ) -> list[dict[str, Any]]:
        d = self.cfg.data
        targets = self.target_reader() if labelled else None
        return load_records(
            path,
            text_column=d.text_column,
            text_pair_column=d.text_pair_column,
            label_column=d.label_column if labelled and targets is None else None,
            dropped=dropped,
            check_label_kinds=d.labels is None,
            targets=targets,
        )

    def _read_filtered(
        self, path: str, notes: list[str], report: FileReport
    ) -> list[dict[str, Any]]:
        """Rows with a text and a label, and with ``data.labels`` set one of those labels."""
        records = self.read_dropping_empty(path, notes, "with an empty text or label", report)
        if self.cfg.data.labels and self.problem_type == "single_label":
            kept, dropped = filter_labels(records, self.cfg.data.labels)
            if dropped:
                counts = ", ".join(f"{lab}: {n}" for lab, n in sorted(dropped.items()))
                notes.append(f"{path}: dropped {sum(dropped.values())} rows ({counts})")
                ids = {id(r) for r in kept}
                report.drop(LABEL_NOT_LISTED, [r["source"] for r in records if id(r) not in ids])
            records = kept
        return records

    def load_splits(self) -> DataSplits:
        notes: list[str] = []
        parts, provenance, split_notes, quality = assemble_splits(
            self.cfg.data,
            self.cfg.train.seed,
            lambda path, report: self._read_filtered(path, notes, report),
        )
        if self.problem_type == "single_label":
            labels = build_label_list(parts["train"], self.cfg.data.labels)
        else:
            labels = self.head_labels(parts, notes)
        label2id = {lab: i for i, lab in enumerate(labels)}
        for split in ("validation", "test"):
            self.check_labels(parts[split], label2id, split)
        return DataSplits(
            train=parts["train"],
            validation=parts["validation"],
            test=parts["test"],
            labels=labels,
            provenance=provenance,
            notes=notes + split_notes,
            quality=quality,
        )

    def encode(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        label2id: Mapping[str, int] | None,
    ) -> list[Feature]:
        limit = self.cfg.data.max_length
        cut = position_cut(tokenizer, limit)
        features: list[Feature] = []
        truncated = 0
        for chunk in chunks(records):
            texts = [r["text"] for r in chunk]
            pairs = [r["text_pair"] for r in chunk] if "text_pair" in chunk[0] else None
            enc = tokenizer(texts, pairs, truncation=True, max_length=limit)
            rows = [{key: enc[key][i] for key in enc} for i in range(len(chunk))]
            if cut is not None:
                long = [i for i, row in enumerate(rows) if len(row["input_ids"]) > cut]
                truncated += len(long)
                if long:  # again at the model's limit, so special tokens stay in place
                    short = tokenizer(
                        [texts[i] for i in long],
                        [pairs[i] for i in long] if pairs is not None else None,
                        truncation=True,
                        max_length=cut,
                    )
                    for j, i in enumerate(long):
                        rows[i] = {key: short[key][j] for key in short}
            for feat, rec in zip(rows, chunk, strict=True):
                if label2id is not None and rec.get("targets") is not None:
                    feat["labels"] = self.head_target(rec, label2id)
                elif label2id is not None and rec.get("label") is not None:
                    feat["labels"] = label2id[rec["label"]]
                features.append(feat)
        if truncated:
            log.warning(
                "%d of %d rows are longer than the model's %d positions (data.max_length is "
                "%d) and were truncated to %d tokens",
                truncated,
                len(records),
                cut,
                limit,
                cut,
            )
        return features

    def grouping_labels(self, features: Sequence[Feature]) -> list[int] | None:
        """Single-label examples' class ids; multi-label and regression targets skip the check."""
        if self.problem_type != "single_label":
            return None
        return [int(f["labels"]) for f in features]

    # -- model --------------------------------------------------------------
    def auto_class(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def build_model(self, labels: Sequence[str], tokenizer: Any) -> torch.nn.Module:
        model = self.load_with_head(labels)
        # transformers' name of the head, so the saved folder says how to read its logits.
        model.config.problem_type = HF_PROBLEM_TYPES[self.problem_type]
        if model.config.pad_token_id is None:
            # Decoder classifiers find the last real token through pad_token_id.
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    def check_labels(
        self, records: Sequence[Mapping[str, Any]], label2id: Mapping[str, int], split: str
    ) -> None:
        if self.problem_type == "single_label":
            check_labels(records, label2id, split)
        else:
            self.check_head_labels(records, label2id, split)

    # -- loss and outputs ---------------------------------------------------
    def loss_sum(self, outputs: Any, batch: Batch) -> torch.Tensor:
        if self.problem_type == "single_label":
            return super().loss_sum(outputs, batch)
        return self.head_loss_sum(outputs.logits, batch["labels"])

    def count_targets(self, batch: Batch) -> torch.Tensor:
        if self.problem_type == "single_label":
            return super().count_targets(batch)
        return torch.tensor(batch["labels"].numel(), device=batch["labels"].device)

    def outputs_to_predictions(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        preds = {"logits": outputs.logits.detach().float()}
        if "labels" in batch:
            preds["labels"] = batch["labels"]
        return preds

    def compute_metrics(
        self, predictions: Mapping[str, torch.Tensor], labels: Sequence[str]
    ) -> dict[str, Any]:
        if self.problem_type != "single_label":
            return self.head_metrics(predictions, labels)
        pred_ids = predictions["logits"].argmax(-1).tolist()
        return classification_metrics(predictions["labels"].tolist(), pred_ids, labels)

    def format_predictions(
        self,
        predictions: Mapping[str, torch.Tensor],
        labels: Sequence[str],
        records: Sequence[Mapping[str, Any]],
    ) -> list[dict[str, Any]]:
        if self.problem_type != "single_label":
            return self.head_predictions(predictions, labels)
        probs = predictions["logits"].softmax(-1)
        out = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append(
                {
                    "label": labels[best],
                    "score": round(row[best], 6),
                    "probabilities": {lab: round(p, 6) for lab, p in zip(labels, row, strict=True)},
                }
            )
        return out
