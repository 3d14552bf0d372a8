"""The knowledge-distillation term (Hinton et al., 2015) as a sum over targets.

Per supervised target (a text, or a labelled sub-token)::

    kd_i = T^2 * KL( softmax(z_teacher / T) || softmax(z_student / T) )

``T^2`` keeps the gradient's scale independent of the temperature, so the mix
``alpha * kd + (1 - alpha) * cross-entropy`` means the same for every T. Like
the task loss it is a *sum* (weighted by the target's class weight when the
run has class weights), so it shares the task's normaliser.
"""

from __future__ import annotations

import torch

from tunesmith.tasks.losses.classification import ClassificationLoss
from tunesmith.tasks.losses.token import IGNORE


def kd_loss_sum(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    class_loss: ClassificationLoss | None = None,
) -> torch.Tensor:
    """Summed ``T^2 * KL(teacher || student)`` over the targets of ``labels`` (-100 ignored).

    Args:
        student: Student logits ``(..., C)``.
        teacher: Teacher logits of the same shape (no gradient flows into them).
        labels: Target labels ``(...)``; they select the positions and, with
            ``class_loss`` weights, weigh them.
        temperature: T.
        class_loss: The task's loss, for its class weights (None: unweighted).
    """
    flat_s = student.reshape(-1, student.shape[-1])
    flat_t = teacher.reshape(-1, teacher.shape[-1]).detach()
    dtype = torch.float64 if flat_s.dtype == torch.float64 else torch.float32
    target = labels.reshape(-1)
    keep = target != IGNORE
    log_s = torch.log_softmax(flat_s[keep].to(dtype) / temperature, dim=-1)
    log_t = torch.log_softmax(flat_t[keep].to(dtype) / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    if class_loss is not None and class_loss.weights is not None:
        kl = kl * class_loss.target_weights(target[keep]).to(dtype)
    return temperature**2 * kl.sum()
