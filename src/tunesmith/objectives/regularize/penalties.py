"""L2-SP and EWC: quadratic pulls of the trained weights toward reference values.

Both are ``strength * sum_i w_i * (theta_i - anchor_i)^2``: L2-SP with
``w = 1`` and the weights at the start of training as anchors (Li et al., ICML
2018: regularise toward the pretrained starting point, not toward zero, which
is what weight decay does); EWC with ``w`` the diagonal Fisher information of a
reference task and its trained weights as anchors (Kirkpatrick et al., PNAS
2017). They are regularisers of the training objective (``train/objective.py``):
added once per optimizer step, logged as ``loss/l2_sp`` and ``loss/ewc``.

Anchors and Fisher values are kept in fp32 on the parameter's device, so the
penalty costs one extra copy of the trained weights (two for EWC).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

#: Name pieces peft adds around the weights it wraps (LoRA ``base_layer``,
#: ``modules_to_save`` copies of the head).
_PEFT_PIECES = (".base_layer", ".modules_to_save.default", ".original_module")


class AnchorPenalty:
    """``strength * sum w * (theta - anchor)^2`` over named parameters.

    Args:
        name: Logged as ``loss/<name>``.
        strength: The factor (L2-SP alpha, EWC lambda).
        params: Parameter name -> the live parameter.
        anchors: Parameter name -> the value it is pulled toward.
        weights: Parameter name -> per-element weight (None: all 1).
    """

    def __init__(
        self,
        name: str,
        strength: float,
        params: Mapping[str, nn.Parameter],
        anchors: Mapping[str, torch.Tensor],
        weights: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.name, self.strength = name, float(strength)
        self.params = {n: params[n] for n in anchors}
        self.anchors = {n: _fp32(a, params[n]) for n, a in anchors.items()}
        self.weights = {n: _fp32(w, params[n]) for n, w in weights.items()} if weights else None

    def penalty(self, model: nn.Module | None = None) -> torch.Tensor:
        """The penalty over the parameters that currently train (frozen ones cannot move)."""
        total = None
        for n, p in self.params.items():
            if not p.requires_grad:
                continue
            diff = (p if p.dtype == torch.float64 else p.float()) - self.anchors[n]
            sq = diff * diff
            term = (sq * self.weights[n]).sum() if self.weights is not None else sq.sum()
            total = term if total is None else total + term
        if total is None:
            device = next(iter(self.anchors.values())).device if self.anchors else "cpu"
            return torch.zeros((), device=device)
        return self.strength * total


def _fp32(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` detached on ``like``'s device, in fp32 (fp64 for fp64 parameters)."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return value.detach().to(device=like.device, dtype=dtype)


def new_parameter_names(model: nn.Module) -> set[str]:
    """Names (peft pieces removed) of the parameters ``load_pretrained`` initialised anew."""
    found: set[str] = set()
    for module in (model, getattr(model, "get_base_model", lambda: None)()):
        found.update(getattr(module, "tunesmith_new_parameters", ()) or ())
    return found


def plain_name(name: str) -> str:
    """A parameter name as the unwrapped transformers model calls it."""
    name = name.removeprefix("base_model.model.")
    for piece in _PEFT_PIECES:
        name = name.replace(piece, "")
    return name


def l2_sp(
    strength: float, model: nn.Module, trained: Iterable[tuple[str, nn.Parameter]]
) -> AnchorPenalty:
    """L2-SP over ``trained`` (name, parameter) pairs, anchored at their current values.

    Parameters that ``load_pretrained`` created anew (a new task head) are left
    out: they have no pretrained value to return to, and weight decay covers them.
    """
    new = new_parameter_names(model)
    params = {n: p for n, p in trained if plain_name(n) not in new}
    return AnchorPenalty(
        "l2_sp", strength, params, {n: p.detach().clone() for n, p in params.items()}
    )


def ewc(
    strength: float,
    params: Mapping[str, nn.Parameter],
    fisher: Mapping[str, torch.Tensor],
    anchors: Mapping[str, torch.Tensor],
) -> AnchorPenalty:
    """EWC over the parameters that have a Fisher value (keys of ``fisher``)."""
    names = [n for n in fisher if n in params and n in anchors]
    return AnchorPenalty(
        "ewc",
        strength,
        params,
        {n: anchors[n] for n in names},
        {n: fisher[n] for n in names},
    )
