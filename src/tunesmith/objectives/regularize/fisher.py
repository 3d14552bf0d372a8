"""The diagonal Fisher information of a task, estimated on reference examples.

``F_i = mean over examples of (d loss(x, y) / d theta_i)^2``: the empirical
Fisher, with the example's labels, one example at a time (a batch gradient
squared would mix examples' gradients and underestimate it). The model runs
in eval mode, as it will be judged. A parameter no example's loss reaches (an
unused head, a frozen-by-design embedding) gets exactly zero: EWC then leaves
it free.

Stored in the run folder (``ewc.safetensors``, Fisher and anchor per
parameter) so a resumed run, whose model no longer holds the reference
weights, penalises exactly what the uninterrupted run did.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.data.batching import Collator

EWC_FILE = "ewc.safetensors"


def estimate_fisher(
    model: nn.Module,
    task: Any,
    features: Sequence[Mapping[str, Any]],
    collator: Collator,
    params: Mapping[str, nn.Parameter],
    *,
    samples: int,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of ``task``'s loss for ``params`` (name -> fp32 tensor).

    Args:
        model: The model whose loss is differentiated (the reference model).
        task: Its task (``model_inputs``, ``loss_sum``).
        features: Encoded, labelled reference examples.
        collator: Pads a single example into a batch.
        params: The parameters to estimate for; those not requiring gradients
            are switched on for the estimate and back off afterwards.
        samples: At most this many examples (a seeded random subset).
        seed: The subset's seed.
    """
    chosen = list(range(len(features)))
    random.Random(seed).shuffle(chosen)
    chosen = chosen[:samples]
    device = next(model.parameters()).device
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    frozen = [p for p in params.values() if not p.requires_grad]
    was_training = model.training
    model.eval()
    for p in frozen:
        p.requires_grad_(True)
    try:
        for i in chosen:
            batch = {k: v.to(device) for k, v in collator([features[i]]).items()}
            model.zero_grad(set_to_none=True)
            loss = task.loss_sum(model(**task.model_inputs(batch)), batch)
            if not loss.requires_grad:
                continue
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().float() ** 2
    finally:
        model.zero_grad(set_to_none=True)
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
    count = max(len(chosen), 1)
    return {n: f / count for n, f in fisher.items()}


def save_ewc(
    folder: Path, fisher: Mapping[str, torch.Tensor], anchors: Mapping[str, torch.Tensor]
) -> Path:
    """Write the Fisher and anchors of every parameter to ``folder/ewc.safetensors``."""
    from safetensors.torch import save_file

    tensors = {f"fisher/{n}": t.contiguous().cpu() for n, t in fisher.items()}
    tensors |= {f"anchor/{n}": t.detach().float().contiguous().cpu() for n, t in anchors.items()}
    path = Path(folder) / EWC_FILE
    save_file(tensors, str(path))
    return path


def load_ewc(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The Fisher and anchors ``save_ewc`` wrote."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    fisher = {k.removeprefix("fisher/"): v for k, v in tensors.items() if k.startswith("fisher/")}
    anchors = {k.removeprefix("anchor/"): v for k, v in tensors.items() if k.startswith("anchor/")}
    return fisher, anchors
