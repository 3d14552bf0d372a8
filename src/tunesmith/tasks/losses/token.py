"""Token cross-entropy sums of the generative tasks (seq2seq, causal LM).

Sums over the supervised targets (-100 ignored); the loop normalises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.batching import IGNORE

#: Label value the losses ignore (padding, masked prompt tokens, sub-word pieces).


def token_cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Summed cross-entropy of ``logits`` (..., vocab) against ``labels`` (...), -100 ignored.

    With ``label_smoothing`` eps the target distribution is (1 - eps) on the
    label plus eps / vocab on every class (PyTorch's definition), computed in
    fp32 whatever the logits' precision.
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
        label_smoothing=label_smoothing,
    )


def shifted_token_cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Causal-LM loss: position t predicts label t + 1 (labels aligned with input ids)."""
    return token_cross_entropy_sum(logits[:, :-1], labels[:, 1:], label_smoothing)
