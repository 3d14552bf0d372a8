"""Unstructured magnitude pruning of the encoder's Linear weights, kept at zero while it recovers.

What is pruned, and why: the weights of every plain ``nn.Linear`` of the encoder
(attention projections, feed-forward layers) — the bulk of a transformer's
compute. Embeddings are lookups (zeroing rows removes tokens, not compute),
LayerNorms are a sliver of the parameters with an outsized effect on every
activation, and the task head and pooler (``PRUNE_SKIP``) are small and feed
the predictions directly: pruning them costs accuracy for nothing.

Masks are plain boolean tensors multiplied into the weights, not
``torch.nn.utils.prune``'s reparametrisation: the model keeps its ordinary
``weight`` parameters, so the training loop, the optimizer groups, ``save_pretrained``
and the saved folder need no ``weight_orig``/``weight_mask`` handling. During
recovery fine-tuning ``MaskKeeper`` masks the gradients (so clipping, gradient
norms and optimizer moments see the pruned model) and re-applies the masks
after every optimizer step (so no optimizer, weight decay or momentum can
revive a pruned weight): pruned weights stay exactly zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from tunesmith.errors import ModelError
from tunesmith.models.quantize import HEAD_NAMES

#: Child-module names that are never pruned: task heads and the pooler (part of the head).
PRUNE_SKIP = HEAD_NAMES | {"pooler"}
SCOPES = ("global", "per_layer")

Masks = dict[str, torch.Tensor]


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers magnitude pruning may zero: qualified name -> module.

    Exact ``nn.Linear`` only (as for int8), outside ``PRUNE_SKIP`` and not the
    output embeddings (a language-model head tied to the input embeddings).

    Raises:
        ModelError: The model has no such layer.
    """
    try:
        outputs = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        outputs = None
    found = {
        name: module
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and module is not outputs
        and not any(part in PRUNE_SKIP for part in name.split("."))
    }
    if not found:
        raise ModelError(f"{type(model).__name__}: no encoder nn.Linear layers to prune")
    return found


def round_targets(target: float, rounds: int) -> list[float]:
    """The sparsity to reach after each round, ending at ``target``.

    The cubic schedule of Zhu & Gupta (2017, "To prune, or not to prune"):
    early rounds remove more, while many weights are redundant, and later rounds
    less, as each weight removed costs more and recovery has less to work with.
    """
    return [target * (1 - (1 - r / rounds) ** 3) for r in range(1, rounds + 1)]


def magnitude_masks(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    scope: str = "global",
    previous: Mapping[str, torch.Tensor] | None = None,
) -> Masks:
    """Keep-masks (True: kept) that zero the ``sparsity`` share of smallest-magnitude weights.

    Ranking by index (``topk``), not by a threshold, so ties (weights already
    zero) cannot overshoot or undershoot the count: exactly
    ``round(sparsity * n)`` weights are pruned, over all tensors together
    (``global``: layers that matter less lose more) or in each tensor
    (``per_layer``: every layer loses the same share). Weights pruned by an
    earlier round (``previous``) rank below every other weight, so masks only grow.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
    scores = {}
    for name, weight in weights.items():
        score = weight.detach().abs().float()
        if previous is not None and name in previous:
            score = torch.where(previous[name], score, torch.full_like(score, -1.0))
        scores[name] = score
    if scope == "per_layer":
        return {name: _keep_mask(score, sparsity) for name, score in scores.items()}
    flat = _keep_mask(torch.cat([s.flatten() for s in scores.values()]), sparsity)
    masks, start = {}, 0
    for name, score in scores.items():
        masks[name] = flat[start : start + score.numel()].view_as(score)
        start += score.numel()
    return masks


def _keep_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    drop = round(sparsity * score.numel())
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if drop:
        keep[torch.topk(score.flatten(), drop, largest=False).indices] = False
    return keep.view_as(score)


@torch.no_grad()
def apply_masks(linears: Mapping[str, nn.Linear], masks: Masks) -> None:
    """Zero the pruned weights in place (the masks become part of the weights)."""
    for name, mask in masks.items():
        linears[name].weight.mul_(mask.to(linears[name].weight.dtype))


def prune_magnitude(
    model: nn.Module, sparsity: float, scope: str = "global", previous: Masks | None = None
) -> Masks:
    """Zero the smallest-magnitude encoder Linear weights of ``model`` in place; the masks."""
    linears = prunable_linears(model)
    masks = magnitude_masks({n: m.weight for n, m in linears.items()}, sparsity, scope, previous)
    apply_masks(linears, masks)
    return masks


def zero_share(tensors: Iterable[torch.Tensor]) -> tuple[int, int]:
    """(zeros, elements) over ``tensors``."""
    zeros = total = 0
    for tensor in tensors:
        zeros += int((tensor == 0).sum())
        total += tensor.numel()
    return zeros, total


def sparsity_stats(model: nn.Module) -> dict[str, Any]:
    """Zeros among the prunable weights (in all and per layer) and among all parameters.

    Measured on the weights themselves, not read from masks: a pruned weight
    that came back to life during recovery would show here.
    """
    linears = prunable_linears(model)
    pruned_zeros, pruned_total = zero_share(m.weight for m in linears.values())
    all_zeros, all_total = zero_share(model.parameters())
    return {
        "pruned_weights": pruned_total,
        "pruned_sparsity": pruned_zeros / pruned_total,
        "per_layer": {n: float((m.weight == 0).float().mean()) for n, m in linears.items()},
        "parameters": all_total,
        "nonzero_parameters": all_total - all_zeros,
        "all_sparsity": all_zeros / all_total,
    }


class MaskKeeper:
    """Training-loop hook that keeps pruned weights exactly zero during recovery.

    ``on_train_start`` registers a gradient hook per pruned weight (the pruned
    entries get no gradient, so clipping and optimizer moments see the pruned
    model) and a post-step hook on the optimizer that multiplies the masks back
    in after every step: the guarantee, whatever the optimizer does with zero
    gradients (weight decay, momentum from before, eps terms). Uses the
    optimizer's own hook API, so the loop needs no pruning-specific event.
    """

    def __init__(self, linears: Mapping[str, nn.Linear], masks: Masks) -> None:
        self.linears, self.masks = dict(linears), dict(masks)
        self._handles: list[Any] = []

    def on_train_start(self, trainer: Any) -> None:
        for name, mask in self.masks.items():
            weight = self.linears[name].weight
            if weight.requires_grad:  # frozen layers (method freeze) cannot change anyway
                keep = mask.to(device=weight.device, dtype=weight.dtype)
                self._handles.append(weight.register_hook(lambda grad, keep=keep: grad * keep))
        # accelerate wraps the torch optimizer; its step calls the inner one's hooks.
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        self._handles.append(inner.register_step_post_hook(lambda *_: self.reapply()))

    def reapply(self) -> None:
        apply_masks(self.linears, self.masks)

    def close(self) -> None:
        """Remove the hooks (the model is then an ordinary model again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
