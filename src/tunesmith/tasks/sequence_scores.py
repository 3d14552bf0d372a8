"""Log-probabilities of chosen token positions of a causal LM, with gradients.

Preference losses are non-linear in each reply's summed log-probability, so the
fused cross-entropy of SFT (which computes its gradient in the forward pass)
does not apply. Instead the LM head runs on the scored positions only: with
the head deferred (``lm_head.forward_to_head``) the hidden states of those
positions go through the head and a log-softmax; the prompt's positions never
reach the vocabulary. Where the head cannot be deferred (an adapter wraps it)
the model's own logits are used, at the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.tasks.lm_head import HiddenOutputs, forward_to_head, labelled_states, text_logits
from tunesmith.tasks.losses import IGNORE


@dataclass
class TokenScores:
    """Per-position log-probabilities of the next token, where scored.

    Attributes:
        dense: (rows, width - 1): log p(token t+1 | tokens <= t) at scored
            positions, 0 elsewhere (differentiable).
        mask: (rows, width - 1) bool: the scored positions.
        log_probs: (scored, vocab) the log-softmax rows of the scored positions,
            kept only when asked for (the KL to a reference needs them).
    """

    dense: torch.Tensor
    mask: torch.Tensor
    log_probs: torch.Tensor | None = None

    def sums(self, where: torch.Tensor | None = None) -> torch.Tensor:
        """Per row: the summed log-probability of the positions in ``where`` (default: all)."""
        keep = self.mask if where is None else self.mask & where
        return (self.dense * keep).sum(1)

    def counts(self, where: torch.Tensor | None = None) -> torch.Tensor:
        """Per row: how many positions ``sums`` adds up."""
        keep = self.mask if where is None else self.mask & where
        return keep.sum(1)


def score_tokens(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    scored: torch.Tensor,
    *,
    keep_log_probs: bool = False,
    temperature: float = 1.0,
) -> TokenScores:
    """Run ``model`` on the rows and score the tokens marked in ``scored``.

    Args:
        model: A causal LM (peft-wrapped or not).
        input_ids: (rows, width) right-padded ids.
        attention_mask: (rows, width).
        scored: (rows, width) bool: the tokens whose log-probability is wanted
            (a token at position t is predicted from position t - 1; position 0
            is never scored).
        keep_log_probs: Also return the full log-softmax rows of the scored positions.
        temperature: Divide the logits by it first: the distribution RL rollouts were
            sampled from (as TRL scores them).
    """
    labels = input_ids.masked_fill(~scored.bool(), IGNORE)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    outputs = forward_to_head(model, inputs)
    if isinstance(outputs, HiddenOutputs):
        hidden, targets = labelled_states(outputs.hidden, labels)
        head = outputs.head
        logits = torch.nn.functional.linear(hidden, head.weight, head.bias)
    else:
        raw = model(**inputs)
        mask = labels[:, 1:] != IGNORE
        logits = text_logits(raw, labels)[:, :-1][mask]
        targets = labels[:, 1:][mask]
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = log_probs.gather(1, targets[:, None]).squeeze(1)
    mask = labels[:, 1:] != IGNORE
    dense = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device)
    dense = dense.masked_scatter(mask, picked)
    return TokenScores(dense, mask, log_probs if keep_log_probs else None)


def token_kl(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """KL(policy || reference) of each row of two log-softmax tables (no gradients)."""
    with torch.no_grad():
        return (policy.exp() * (policy - reference)).sum(-1)
