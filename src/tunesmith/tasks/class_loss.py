"""The loss of the classification-like tasks, shared by sequence and token classification.

Both tasks are a class per target (a text, or a sub-token), so they share one
:class:`~tunesmith.tasks.losses.classification.ClassificationLoss` configured by
``task.label_smoothing`` and the ``loss`` section; they differ only in which
logits line up with the labels (``loss_logits``).
"""

from __future__ import annotations

from typing import Any

import torch

from tunesmith.tasks.base import Batch
from tunesmith.tasks.losses.classification import ClassificationLoss


class ClassLoss:
    """Mixin for :class:`~tunesmith.tasks.base.Task`: ``loss_sum`` and ``count_targets``.

    ``count_targets`` is the sum of the targets' class weights (their number
    without weights), so the loop's window normalisation stays exact.
    """

    cfg: Any
    class_weights: list[float] | None

    def loss_logits(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """The logits that line up with ``batch["labels"]``."""
        return outputs.logits

    def loss_function(self) -> ClassificationLoss:
        """The loss for the current settings (rebuilt when the class weights change)."""
        key = (tuple(self.class_weights or ()), self.cfg.task.label_smoothing)
        cached = getattr(self, "_loss_cache", None)
        if cached is None or cached[0] != key:
            loss = self.cfg.loss
            gamma = loss.focal_gamma if loss.type == "focal" else 0.0
            fn = ClassificationLoss(self.class_weights, self.cfg.task.label_smoothing, gamma)
            self._loss_cache = cached = (key, fn)
        return cached[1]

    def loss_sum(self, outputs: Any, batch: Batch) -> torch.Tensor:
        return self.loss_function().loss_sum(self.loss_logits(outputs, batch), batch["labels"])

    def count_targets(self, batch: Batch) -> torch.Tensor:
        return self.loss_function().normaliser(batch["labels"])
