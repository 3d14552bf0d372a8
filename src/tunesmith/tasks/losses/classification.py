"""The loss of the classification-like tasks: cross-entropy, label smoothing, class weights, focal.

One object serves sequence classification (logits ``(B, C)``, labels ``(B,)``)
and token classification (logits ``(B, L, C)``, labels ``(B, L)`` with -100 on
padding and ignored sub-tokens), so both tasks get the same options with no
second copy of the arithmetic.

Per supervised target ``i`` with label ``y`` and class log-probabilities ``log p``::

    ce_i   = (1 - eps) * -log p_y  +  eps / C * sum_c -log p_c      (label smoothing eps)
    loss_i = w_y * (1 - p_y) ** gamma * ce_i                        (class weight w, focal gamma)

``loss_sum`` returns ``sum_i loss_i`` and ``normaliser`` returns ``sum_i w_y``
(the number of targets when there are no weights). The loop divides the
window's summed loss by the window's summed normaliser, so the loss is the
weighted mean PyTorch's ``CrossEntropyLoss(weight=...)`` defines, and gradient
accumulation over micro-batches of different class mixes still equals one
large batch exactly (a per-micro-batch weighted mean would not).

With ``gamma = 0`` and no weights this is exactly ``F.cross_entropy`` with
``label_smoothing=eps``. With weights, the smoothing term is weighted by the
*target's* class (the whole smoothed target distribution of an example counts
``w_y`` times); PyTorch instead weights each smoothed class by its own weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tunesmith.tasks.losses.token import IGNORE


class ClassificationLoss:
    """Weighted, label-smoothed, optionally focal cross-entropy as a sum over targets.

    Args:
        weights: One weight per class (None: every class 1).
        label_smoothing: Epsilon in [0, 1).
        gamma: Focal-loss focusing parameter; 0 is plain cross-entropy.
    """

    def __init__(
        self,
        weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        gamma: float = 0.0,
    ) -> None:
        self.weights = torch.tensor(list(weights), dtype=torch.float64) if weights else None
        self.label_smoothing = float(label_smoothing)
        self.gamma = float(gamma)

    def per_target(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of every supervised target and its weight, both shaped ``(targets,)``.

        Computed in fp32 (fp64 when the logits are fp64, for gradcheck) whatever
        the logits' precision: bf16 log-probabilities lose the small differences
        that focal and smoothing terms depend on.
        """
        flat = logits.reshape(-1, logits.shape[-1])
        flat = flat if flat.dtype == torch.float64 else flat.float()
        target = labels.reshape(-1)
        keep = target != IGNORE
        logp = torch.log_softmax(flat[keep], dim=-1)
        target = target[keep]
        logp_y = logp.gather(1, target[:, None]).squeeze(1)
        loss = -logp_y
        if self.label_smoothing:
            eps = self.label_smoothing
            loss = (1 - eps) * loss - eps * logp.mean(dim=-1)
        if self.gamma:
            loss = (1 - logp_y.exp()).clamp(min=0) ** self.gamma * loss
        return loss, self.target_weights(target).to(loss.dtype)

    def target_weights(self, target: torch.Tensor) -> torch.Tensor:
        """The class weight of each (already filtered, non-ignored) target label."""
        if self.weights is None:
            return torch.ones(target.shape, dtype=torch.float32, device=target.device)
        return self.weights.to(target.device)[target].float()

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed loss over the targets (labels of -100 ignored)."""
        loss, weight = self.per_target(logits, labels)
        return (loss * weight).sum()

    def normaliser(self, labels: torch.Tensor) -> torch.Tensor:
        """What the loop divides the summed loss by: the targets' summed weight.

        Without class weights this is the integer number of targets, as before.
        """
        target = labels.reshape(-1)
        target = target[target != IGNORE]
        if self.weights is None:
            return torch.tensor(target.numel(), device=labels.device)
        return self.target_weights(target).sum()
