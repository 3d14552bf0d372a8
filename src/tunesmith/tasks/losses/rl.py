"""GRPO and RLOO: advantages from rewards, the clipped policy loss and its normalisers.

Everything follows TRL 1.16 (the oracle of ``tests/test_rl_trl.py``):

* GRPO advantages: reward minus the mean of its group, divided by the group's
  (``scale_rewards: group``) or the whole batch's (``batch``) unbiased standard
  deviation plus 1e-4, or not divided (``none``).
* RLOO advantages: reward minus the mean of the *other* completions of its
  group (the leave-one-out baseline), optionally standardised over the batch.
* The policy loss per token: ``-min(r * A, clip(r, 1 - eps, 1 + eps_high) * A)``
  with ``r = exp(logp - old_logp)``, plus ``beta`` times the k3 estimate of the
  KL to the reference, ``exp(ref - logp) - (ref - logp) - 1``, times the ratio
  unless ``rl.kl_bias_correction`` is off (GRPO only: RLOO folds the KL into
  the reward instead).

The loop divides a window's summed loss by its summed targets
(``Task.count_targets``), so each ``loss_type`` is a pair (what is summed per
micro-batch, what is counted): ``grpo`` sums each row's token mean and counts
rows; ``bnpo`` sums the micro-batch's token mean times its rows and counts
rows (a mean of micro-batch means); ``dr_grpo`` sums tokens over
``max_new_tokens`` and counts rows; ``dapo`` sums tokens and counts tokens of
the whole window (every process).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Added to the standard deviation before dividing by it (TRL's constant).
STD_EPS = 1e-4


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """Rewards (groups of ``group_size`` consecutive rows) as GRPO advantages."""
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    if scale == "group":
        std = grouped.std(1).repeat_interleave(group_size)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards)
    elif scale == "none":
        return advantages
    else:
        raise ValueError(f"unknown scale_rewards {scale!r}")
    return advantages / (std + STD_EPS)


def rloo_advantages(rewards: torch.Tensor, group_size: int, normalize: bool) -> torch.Tensor:
    """Rewards minus the mean of the other completions of their group (RLOO)."""
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    advantages = (grouped - baseline).view(-1)
    if normalize:
        advantages = (advantages - advantages.mean()) / (advantages.std() + STD_EPS)
    return advantages


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference) (non-negative, unbiased)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


@dataclass(frozen=True)
class Clip:
    """The ratio's clip range ``[1 - low, 1 + high]``."""

    low: float
    high: float

    def objective(self, ratio: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
        """``-min(r A, clip(r) A)``: the clipped surrogate to minimise."""
        clipped = torch.clamp(ratio, 1 - self.low, 1 + self.high)
        return -torch.min(ratio * advantages, clipped * advantages)

    def clipped(self, ratio: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
        """Where the clip takes effect (no gradient flows): TRL's ``clip_ratio/region``."""
        low = (ratio < 1 - self.low) & (advantages < 0)
        high = (ratio > 1 + self.high) & (advantages > 0)
        return low | high


def grpo_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    clip: Clip,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_correction: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token GRPO loss (rows, tokens) and where the ratio was clipped.

    Args:
        logps: The policy's token log-probabilities (with gradients).
        old_logps: Those of the policy that sampled the rollouts (no gradients).
        advantages: One per row.
        clip: The ratio's clip range.
        ref_logps: The reference's token log-probabilities (needed when ``beta`` > 0).
        beta: Weight of the k3 KL term.
        kl_correction: Multiply the KL term by the ratio (TRL's default
            ``use_bias_correction_kl``): its gradient is then the unbiased
            reverse-KL gradient also off-policy (DeepSeek-V3.2).
    """
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    loss = clip.objective(ratio, adv)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("a KL term (beta > 0) needs the reference's log-probabilities")
        kl = k3_kl(logps, ref_logps)
        loss = loss + beta * (kl * ratio if kl_correction else kl)
    return loss, clip.clipped(ratio.detach(), adv)


def grpo_loss_sum(
    token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int
) -> torch.Tensor:
    """The micro-batch's summed loss for ``loss_type`` (see the module docstring)."""
    masked = token_loss * mask
    rows = mask.shape[0]
    if loss_type == "grpo":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1) * rows
    if loss_type == "dr_grpo":
        return masked.sum() / max_new_tokens
    if loss_type == "dapo":
        return masked.sum()
    raise ValueError(f"unknown loss_type {loss_type!r}")


def grpo_targets(mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """What ``grpo_loss_sum`` is divided by, summed over the window: tokens (dapo) or rows."""
    if loss_type == "dapo":
        return mask.sum()
    return torch.tensor(mask.shape[0], device=mask.device)


def rloo_loss_sum(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    clip: Clip,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO's summed per-sequence clipped loss (the ratio of whole completions) and clipping."""
    ratio = torch.exp((logps * mask).sum(1) - (old_logps * mask).sum(1))
    return clip.objective(ratio, advantages).sum(), clip.clipped(ratio.detach(), advantages)
