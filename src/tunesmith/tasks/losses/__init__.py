"""Loss functions shared by the tasks, and the ``loss`` config section.

Every loss here is a *sum* over the supervised targets (positions labelled
-100 are ignored): the training loop divides by the targets of the whole
accumulation window (or, with class weights, by the sum of the targets'
weights), so gradient accumulation equals one large batch.

``token``: token cross-entropy of the generative tasks; ``classification``:
the class-weighted, label-smoothed, focal loss of the classification-like
tasks; ``distill``: the knowledge-distillation term.
"""

from __future__ import annotations

from tunesmith.tasks.losses.token import (
    IGNORE,
    shifted_token_cross_entropy_sum,
    token_cross_entropy_sum,
)

__all__ = ["IGNORE", "shifted_token_cross_entropy_sum", "token_cross_entropy_sum"]
