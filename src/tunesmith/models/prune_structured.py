"""Structured pruning of BERT-like encoders: remove whole attention heads or FFN neurons.

Unlike zeroed weights, removed heads and neurons make the matrices smaller, so
the model really computes less. transformers 5 no longer ships ``prune_heads``,
so the projections are sliced here:

* a head ``h`` (of size ``d``) owns rows ``h*d .. h*d+d-1`` of the query, key
  and value projections and the same *columns* of the attention output
  projection; removing it drops those rows and columns;
* an FFN neuron ``j`` owns row ``j`` of the intermediate projection and column
  ``j`` of the output projection.

Why slicing is exact: BERT's self-attention reshapes its projections as
``(..., -1, attention_head_size)`` and joins the heads back with
``reshape(..., -1)``, and its scaling depends on the head size only — so a
layer with fewer heads computes exactly what the full layer computes with
those heads' outputs set to zero. The same holds for neurons (each neuron's
activation reaches the output only through its column). At least one head and
one neuron stay in every layer: an empty projection cannot be reshaped.

Which units go is decided by an importance score per unit: the L2 norm of the
weights it owns (``magnitude``), or the first-order estimate of how much the
loss changes when the unit is switched off (``gradient``, Michel et al. 2019,
"Are Sixteen Heads Really Better than One?"), summed over a few training
batches. The gradient score needs no extra gates: for the output projection
``W`` fed by a unit's activations ``a``, ``sum_t a_t * dL/da_t`` equals
``sum over the unit's columns of W * dL/dW``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tunesmith.errors import ModelError

KINDS = ("heads", "neurons")
IMPORTANCE = ("magnitude", "gradient")
#: transformers model types whose encoder layers have BERT's module layout and reshaping.
SUPPORTED_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
#: Original unit ids kept per layer, per kind: {"heads": [[0, 2], ...], "neurons": [...]}.
Kept = dict[str, list[list[int]]]


def encoder_layers(model: nn.Module, where: Any = None) -> list[nn.Module]:
    """The encoder layers of a BERT-like model, checked to have the layout slicing assumes.

    Raises:
        ModelError: Another architecture, a decoder or cross-attention, or a
            layout that differs from BERT's (one line naming what is supported).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    fits = (
        model_type in SUPPORTED_TYPES
        and layers is not None
        and not getattr(config, "is_decoder", False)
        and all(_has_bert_layout(layer) for layer in layers)
    )
    if not fits:
        raise ModelError(
            f"structured pruning: {where or type(model).__name__} is a '{model_type}' model; "
            f"heads and neurons can be pruned in BERT-like encoders only "
            f"({', '.join(SUPPORTED_TYPES)}); use --kind magnitude"
        )
    return list(layers)


def _has_bert_layout(layer: nn.Module) -> bool:
    try:
        attention = layer.attention.self
        linears = [
            attention.query,
            attention.key,
            attention.value,
            layer.attention.output.dense,
            layer.intermediate.dense,
            layer.output.dense,
        ]
    except AttributeError:
        return False
    return all(type(m) is nn.Linear for m in linears) and not hasattr(layer, "crossattention")


def full_kept(model: nn.Module) -> Kept:
    """Every unit of every layer, as the unpruned architecture has them."""
    layers = encoder_layers(model)
    return {
        "heads": [list(range(layer.attention.self.num_attention_heads)) for layer in layers],
        "neurons": [list(range(layer.intermediate.dense.out_features)) for layer in layers],
    }


def _owners(layer: nn.Module, kind: str) -> tuple[list[nn.Linear], nn.Linear, int]:
    """The projections whose rows a unit owns, the one whose columns it owns, rows per unit."""
    if kind == "heads":
        attention = layer.attention.self
        rows = [attention.query, attention.key, attention.value]
        return rows, layer.attention.output.dense, attention.attention_head_size
    return [layer.intermediate.dense], layer.output.dense, 1


def magnitude_scores(layer: nn.Module, kind: str) -> torch.Tensor:
    """L2 norm of the weights (and biases) each unit owns in ``layer``: [units]."""
    rows, cols, size = _owners(layer, kind)
    units = cols.in_features // size
    squares = cols.weight.detach().float().pow(2).sum(0).view(units, size).sum(-1)
    for linear in rows:
        squares += linear.weight.detach().float().pow(2).sum(1).view(units, size).sum(-1)
        if linear.bias is not None:
            squares += linear.bias.detach().float().pow(2).view(units, size).sum(-1)
    return squares.sqrt()


def gradient_scores(
    model: nn.Module,
    kind: str,
    batches: Iterable[Mapping[str, torch.Tensor]],
    loss: Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor],
    inputs: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]],
) -> list[torch.Tensor]:
    """Per layer: sum over ``batches`` of |dL/d(unit gate)| for each unit: [units].

    ``loss(outputs, batch)`` is the batch's loss and ``inputs(batch)`` the
    model's arguments (the task's ``loss_sum`` and ``model_inputs``). Runs in
    eval mode (no dropout noise in the score); gradients are dropped afterwards.
    """
    layers = encoder_layers(model)
    outputs = [_owners(layer, kind)[1] for layer in layers]
    sizes = [_owners(layer, kind)[2] for layer in layers]
    was_training = model.training
    held = [w.weight.requires_grad for w in outputs]
    scores = [torch.zeros(w.in_features // s) for w, s in zip(outputs, sizes, strict=True)]
    model.eval()
    try:
        for linear in outputs:
            linear.weight.requires_grad_(True)
        for batch in batches:
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss(model(**inputs(batch)), batch).backward()
            for i, (linear, size) in enumerate(zip(outputs, sizes, strict=True)):
                gate = (linear.weight.detach() * linear.weight.grad).float().sum(0)
                scores[i] += gate.view(-1, size).sum(-1).abs().cpu()
    finally:
        model.zero_grad(set_to_none=True)
        for linear, flag in zip(outputs, held, strict=True):
            linear.weight.requires_grad_(flag)
        model.train(was_training)
    return scores


def choose_kept(
    scores: Sequence[torch.Tensor],
    originals: Sequence[int],
    fraction: float,
    scope: str = "per_layer",
) -> list[list[int]]:
    """Positions (in each layer's current units) to keep so ``fraction`` of the original
    units are gone, dropping the least important first and keeping one per layer at least.

    ``originals``: each layer's unit count before any pruning (rounds prune a
    layer that is already smaller). ``per_layer``: every layer loses
    ``round(fraction * original)``; ``global``: the ``round(fraction * total)``
    least important units of the whole encoder go, with scores divided by their
    layer's L2 norm first (Michel et al.: raw scores differ in scale between layers).
    """
    current = [len(s) for s in scores]
    if scope == "per_layer":
        drops = [
            min(max(round(fraction * n) - (n - c), 0), c - 1)
            for n, c in zip(originals, current, strict=True)
        ]
        return [_keep_top(s, c - d) for s, c, d in zip(scores, current, drops, strict=True)]
    to_drop = max(round(fraction * sum(originals)) - (sum(originals) - sum(current)), 0)
    ranked = sorted(
        (float(v) / max(float(s.norm()), 1e-12), layer, pos)
        for layer, s in enumerate(scores)
        for pos, v in enumerate(s)
    )
    dropped: list[set[int]] = [set() for _ in scores]
    for _value, layer, pos in ranked:
        if to_drop == 0:
            break
        if len(dropped[layer]) < current[layer] - 1:
            dropped[layer].add(pos)
            to_drop -= 1
    return [[p for p in range(c) if p not in d] for c, d in zip(current, dropped, strict=True)]


def _keep_top(score: torch.Tensor, keep: int) -> list[int]:
    return sorted(torch.topk(score, keep).indices.tolist())


def _rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """A Linear with only the output rows ``index`` of ``linear``."""
    new = nn.Linear(linear.in_features, len(index), bias=linear.bias is not None)
    new = new.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[index])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[index])
    new.weight.requires_grad_(linear.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new


def _cols(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """A Linear with only the input columns ``index`` of ``linear`` (bias unchanged)."""
    new = nn.Linear(len(index), linear.out_features, bias=linear.bias is not None)
    new = new.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, index])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new


def slice_layer(layer: nn.Module, kind: str, keep: Sequence[int]) -> None:
    """Keep only units ``keep`` (positions among the layer's current units) of ``layer``."""
    if not keep:
        raise ValueError("a layer must keep at least one unit")
    _rows_of, cols, size = _owners(layer, kind)
    index = torch.tensor([u * size + i for u in keep for i in range(size)], dtype=torch.long)
    if kind == "heads":
        attention = layer.attention.self
        for name in ("query", "key", "value"):
            setattr(attention, name, _rows(getattr(attention, name), index))
        layer.attention.output.dense = _cols(cols, index)
        # Read by nothing in BERT's forward (it reshapes with -1), kept true for readers.
        attention.num_attention_heads = len(keep)
        attention.all_head_size = len(keep) * size
    else:
        layer.intermediate.dense = _rows(layer.intermediate.dense, index)
        layer.output.dense = _cols(cols, index)


def prune_units(
    model: nn.Module,
    kind: str,
    fraction: float,
    kept: Kept,
    *,
    scope: str = "per_layer",
    scores: Sequence[torch.Tensor] | None = None,
) -> Kept:
    """Slice away ``kind`` units of ``model`` in place until ``fraction`` of the original
    units are gone; returns the updated ``kept`` (original ids per layer).

    ``kept`` describes the model as it is (``full_kept`` for an unpruned one);
    ``scores`` per layer and current unit (None: ``magnitude_scores``).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    layers = encoder_layers(model)
    if scores is None:
        scores = [magnitude_scores(layer, kind) for layer in layers]
    originals = [_original_count(model, kind)] * len(layers)
    positions = choose_kept(scores, originals, fraction, scope)
    updated = {k: [list(ids) for ids in v] for k, v in kept.items()}
    for i, (layer, keep) in enumerate(zip(layers, positions, strict=True)):
        if len(keep) < len(kept[kind][i]):
            slice_layer(layer, kind, keep)
            updated[kind][i] = [kept[kind][i][p] for p in keep]
    return updated


def _original_count(model: nn.Module, kind: str) -> int:
    """Units per layer of the unpruned architecture (the config describes it)."""
    config = model.config
    return config.num_attention_heads if kind == "heads" else config.intermediate_size


def apply_kept(model: nn.Module, kept: Kept) -> None:
    """Slice an unpruned ``model`` to the recorded ``kept`` units (loading a pruned folder).

    Raises:
        ValueError: ``kept`` does not fit the architecture (layer count, ids out of range,
            repeated or unsorted ids, an empty layer).
    """
    layers = encoder_layers(model)
    for kind in KINDS:
        per_layer = kept.get(kind)
        if not isinstance(per_layer, list) or len(per_layer) != len(layers):
            raise ValueError(f"'{kind}' must list the kept ids of each of {len(layers)} layers")
        count = _original_count(model, kind)
        for i, (layer, ids) in enumerate(zip(layers, per_layer, strict=True)):
            valid = isinstance(ids, list) and all(isinstance(u, int) for u in ids)
            if not (valid and ids and ids == sorted(set(ids)) and ids[0] >= 0 and ids[-1] < count):
                raise ValueError(
                    f"layer {i}: '{kind}' must be sorted distinct ids in 0..{count - 1}, "
                    "at least one"
                )
            if len(ids) < count:
                slice_layer(layer, kind, ids)


def unit_counts(kept: Kept) -> dict[str, int]:
    """Units kept in all layers, per kind."""
    return {kind: sum(len(ids) for ids in per_layer) for kind, per_layer in kept.items()}
