"""The gradcheck helper catches a wrong backward and passes correct ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tunesmith.testing import gradcheck_module


class _WrongBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x  # should be 2 * x


class _Square(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _WrongBackward.apply(x) * self.scale


def test_gradcheck_passes_on_a_linear_head_with_our_loss():
    head = nn.Sequential(nn.Dropout(0.5), nn.Linear(6, 3))
    x = torch.randn(4, 6)
    labels = torch.tensor([0, 2, 1, 2])

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, labels, reduction="sum")

    assert gradcheck_module(head, [x], output_fn=loss)


def test_gradcheck_catches_a_wrong_backward():
    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        gradcheck_module(_Square(), [torch.randn(3)])


def test_gradcheck_leaves_the_module_untouched():
    layer = nn.Linear(3, 2)
    before = layer.weight.clone()
    gradcheck_module(layer, [torch.randn(2, 3)])
    assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, before)
