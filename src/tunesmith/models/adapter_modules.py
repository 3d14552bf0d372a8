"""Adapter modules that plug into a model's blocks, shared by the methods and multi-task.

The bottleneck adapter (Houlsby-style) and the helper that applies a function to
a block's hidden states whatever shape its output has. They are model parts, not
a training method: the ``bottleneck`` method inserts them into a frozen base, and
the shared-private multi-task model gives each task its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunesmith.errors import ModelError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(h)))``; the identity until trained (``up`` starts at zero).

    Args:
        hidden_size: Size ``d`` of the hidden states it adapts.
        reduction_factor: The bottleneck has ``d // reduction_factor`` units.
        activation: ``relu`` | ``gelu`` | ``tanh`` | ``silu``.

    The adapter's weights stay in their own dtype (float32 as created); inputs
    of another dtype are cast in and the update cast back, so an adapter on a
    half-precision base still trains in float32.
    """

    def __init__(self, hidden_size: int, reduction_factor: int = 16, activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation '{activation}' (one of: {', '.join(ACTIVATIONS)})"
            )
        bottleneck = hidden_size // reduction_factor
        if bottleneck < 1:
            raise ValueError(
                f"reduction_factor {reduction_factor} leaves no bottleneck unit for hidden "
                f"size {hidden_size}"
            )
        self.hidden_size = hidden_size
        self.bottleneck_size = bottleneck
        self.activation = activation
        self.down = nn.Linear(hidden_size, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform ``down`` (zero bias); ``up`` all zero: the exact identity."""
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        x = hidden if hidden.dtype == dtype else hidden.to(dtype)
        update = self.up(self.act(self.down(x)))
        return hidden + (update if update.dtype == hidden.dtype else update.to(hidden.dtype))

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, bottleneck={self.bottleneck_size}"


def map_hidden(output: Any, fn: Any, module: nn.Module) -> Any:
    """``output`` with its hidden states (the first tensor) replaced by ``fn(hidden)``.

    Blocks return a tensor, a (named) tuple or list whose first element is the
    hidden states, or a ``ModelOutput``; the rest passes through unchanged.

    Raises:
        ModelError: The output holds no hidden-state tensor first.
    """
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        first = fn(output[0])
        if hasattr(output, "_fields"):  # a namedtuple keeps its type
            return output._replace(**{output._fields[0]: first})  # type: ignore[attr-defined]
        return (first, *output[1:])
    if isinstance(output, list) and output and isinstance(output[0], torch.Tensor):
        return [fn(output[0]), *output[1:]]
    if isinstance(output, dict) and output:  # transformers ModelOutput
        name = next(iter(output))
        if isinstance(output[name], torch.Tensor):
            output[name] = fn(output[name])
            return output
    raise ModelError(
        f"cannot adapt the output of {type(module).__name__} ({type(output).__name__}); "
        "name the block lists with method.blocks"
    )
