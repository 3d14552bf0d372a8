"""The preference losses, per pair (or per KTO row), from sequence log-probabilities.

Each function takes the summed log-probabilities of the scored reply tokens
(``PairScores``) and returns one loss per pair; the task sums them and the loop
divides by the pairs of the whole accumulation window, so accumulation equals
one large batch. The formulas are TRL 1.16's (``DPOTrainer`` for dpo, ipo,
hinge and robust; ``CPOTrainer`` with ``loss_type="simpo"`` and
``cpo_alpha=0``; ``ORPOTrainer``; ``KTOTrainer``), which the tests compare with
value by value and gradient by gradient. Where TRL departs from the paper:

* IPO divides each reply's log-ratio by its token count (TRL's normalisation,
  confirmed with the IPO authors according to TRL); the paper's formula sums.
* ORPO's NLL term is TRL's: the mean over *every* token of the chosen sequence,
  prompt included, of the micro-batch; its odds ratio uses mean token
  log-probabilities of the replies.
* KTO's KL estimate is detached and clamped at 0, from mismatched
  (prompt, completion) pairs of the same batch, as TRL computes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairScores:
    """Summed reply log-probabilities of a batch of pairs (each tensor: one value per pair).

    Attributes:
        chosen: Policy log-probability of each chosen reply.
        rejected: Policy log-probability of each rejected reply.
        ref_chosen: The reference's (None for reference-free losses).
        ref_rejected: The reference's (None for reference-free losses).
        chosen_tokens: Scored tokens of each chosen reply.
        rejected_tokens: Scored tokens of each rejected reply.
        chosen_nll: ORPO only: mean NLL of the chosen sequences' tokens (a scalar).
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    chosen_tokens: torch.Tensor | None = None
    rejected_tokens: torch.Tensor | None = None
    chosen_nll: torch.Tensor | None = None

    def logratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy minus reference log-probability, for the chosen and the rejected replies."""
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError("this loss needs the reference's log-probabilities")
        return self.chosen - self.ref_chosen, self.rejected - self.ref_rejected

    def mean_logps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy log-probabilities per reply token (SimPO's and ORPO's length normalisation)."""
        if self.chosen_tokens is None or self.rejected_tokens is None:
            raise ValueError("this loss needs the replies' token counts")
        return (
            self.chosen / self.chosen_tokens.clamp(min=1),
            self.rejected / self.rejected_tokens.clamp(min=1),
        )


@dataclass(frozen=True)
class LossParams:
    """What the losses read of ``preference`` and ``task`` (plain numbers, no config)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


PairLoss = Callable[[PairScores, LossParams], torch.Tensor]


def _delta(s: PairScores) -> torch.Tensor:
    chosen, rejected = s.logratios()
    return chosen - rejected


def dpo(s: PairScores, p: LossParams) -> torch.Tensor:
    """DPO's sigmoid loss: -log sigma(beta * (chosen log-ratio - rejected log-ratio))."""
    return -F.logsigmoid(p.beta * _delta(s))


def hinge(s: PairScores, p: LossParams) -> torch.Tensor:
    """SLiC's hinge: max(0, 1 - beta * delta)."""
    return torch.relu(1 - p.beta * _delta(s))


def ipo(s: PairScores, p: LossParams) -> torch.Tensor:
    """IPO: (delta per token - 1 / (2 beta))^2, each reply's log-ratio divided by its length."""
    chosen, rejected = s.logratios()
    if s.chosen_tokens is None or s.rejected_tokens is None:
        raise ValueError("ipo needs the replies' token counts")
    delta = chosen / s.chosen_tokens.clamp(min=1) - rejected / s.rejected_tokens.clamp(min=1)
    return (delta - 1 / (2 * p.beta)) ** 2


def robust(s: PairScores, p: LossParams) -> torch.Tensor:
    """Robust DPO: unbiased under a share ``label_smoothing`` of flipped pairs."""
    eps, z = p.label_smoothing, p.beta * _delta(s)
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def simpo(s: PairScores, p: LossParams) -> torch.Tensor:
    """SimPO: -log sigma(beta * (mean chosen - mean rejected log-prob) - gamma), no reference."""
    chosen, rejected = s.mean_logps()
    return -F.logsigmoid(p.beta * (chosen - rejected) - p.simpo_gamma)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, branching at -ln 2 against cancellation."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


def orpo(s: PairScores, p: LossParams) -> torch.Tensor:
    """ORPO: the chosen sequences' NLL minus beta * log sigma(log odds ratio), per pair."""
    chosen, rejected = (x.float() for x in s.mean_logps())
    if s.chosen_nll is None:
        raise ValueError("orpo needs the chosen sequences' NLL")
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    return s.chosen_nll - p.beta * F.logsigmoid(log_odds)


#: Paired losses by ``preference.loss`` name.
PAIR_LOSSES: dict[str, PairLoss] = {
    "dpo": dpo,
    "ipo": ipo,
    "hinge": hinge,
    "robust": robust,
    "simpo": simpo,
    "orpo": orpo,
}


def pair_rewards(s: PairScores, loss: str, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit rewards TRL logs: beta * log-ratio; reference-free losses score the policy.

    SimPO's reward is beta times the mean token log-probability, ORPO's beta
    times its mean token log-probability too (TRL's ``rewards/chosen``).
    """
    with torch.no_grad():
        if loss in ("simpo", "orpo"):
            chosen, rejected = s.mean_logps()
        else:
            chosen, rejected = s.logratios()
        return beta * chosen.detach(), beta * rejected.detach()


def kto(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    p: LossParams,
) -> torch.Tensor:
    """KTO's per-row loss (TRL's ``loss_type="kto"``).

    Args:
        logps: Policy log-probability of each row's completion.
        ref_logps: The reference's.
        desirable: Bool per row.
        kl: The batch's KL estimate (detached, clamped at 0).
        p: beta and the desirable/undesirable weights.
    """
    ratio = logps - ref_logps
    good = p.desirable_weight * (1 - torch.sigmoid(p.beta * (ratio - kl)))
    bad = p.undesirable_weight * (1 - torch.sigmoid(p.beta * (kl - ratio)))
    return torch.where(desirable, good, bad)


def kto_kl(mismatched: torch.Tensor, ref_mismatched: torch.Tensor) -> torch.Tensor:
    """The batch's KL estimate from mismatched pairs: mean log-ratio, detached, at least 0."""
    return (mismatched - ref_mismatched).mean().detach().clamp(min=0)
