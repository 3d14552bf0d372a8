"""Testing helpers for custom layers and losses (used by tunesmith's own tests).

``gradcheck_module`` compares a module's analytic gradients with finite
differences in float64: the check every custom head, loss and adapter we write
must pass before it trains anything.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def gradcheck_module(
    module: nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    check_inputs: bool = True,
    atol: float = 1e-6,
    rtol: float = 1e-4,
) -> bool:
    """Run ``torch.autograd.gradcheck`` on ``module``'s parameters (and float inputs).

    The module and inputs are copied to float64 (finite differences in float32
    are too coarse to mean anything), the module is put in eval mode (dropout
    would make the function random), and every parameter is checked.

    Args:
        module: The module to check; it is not modified.
        inputs: Positional inputs; float tensors are checked too when
            ``check_inputs`` (integer tensors such as labels pass through).
        output_fn: Maps the module's output to a tensor (e.g. ``lambda o: o.logits``).
        check_inputs: Also check gradients with respect to float inputs.
        atol: Absolute tolerance.
        rtol: Relative tolerance.

    Returns:
        True when the check passes.

    Raises:
        torch.autograd.gradcheck.GradcheckError: With the mismatching Jacobian.
    """
    mod = copy.deepcopy(module).double().eval()
    names, params = zip(
        *[(n, p) for n, p in mod.named_parameters() if p.requires_grad], strict=True
    )
    xs = [
        x.detach().double().requires_grad_(check_inputs) if x.is_floating_point() else x
        for x in inputs
    ]

    def fn(*flat: torch.Tensor) -> torch.Tensor:
        n_in = len(xs)
        call_inputs, call_params = flat[:n_in], flat[n_in:]
        state = dict(zip(names, call_params, strict=True))
        out = torch.func.functional_call(mod, state, tuple(call_inputs))
        return output_fn(out) if output_fn is not None else out

    return bool(torch.autograd.gradcheck(fn, (*xs, *params), atol=atol, rtol=rtol))
