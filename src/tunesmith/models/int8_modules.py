"""Int8 stand-ins for ``nn.Linear`` and ``nn.Embedding`` whose state is plain tensors.

Both keep their weights as an int8 matrix plus one float32 scale per row
(symmetric: ``weight ~= weight_int8 * weight_scale[:, None]``, no zero point),
stored as ordinary buffers, so a quantized model's ``state_dict`` goes into a
safetensors file and back like any other: no quantized tensor types and no
pickled packed-weight objects ever reach the disk.

Why the Linear runs on ``torch.ops.quantized.linear_dynamic`` (fbgemm, the
``torch.ao`` dynamic-quantization kernel) and not on torchao's
``Int8DynamicActivationInt8WeightConfig``: torchao's int8 x int8 product goes
through ``torch._int_mm``, which on an x86 CPU without AMX is a reference loop,
measured about 30x slower than the fp32 matmul on an AVX2 machine (MiniLM at
batch 32: 0.08x the fp32 speed), while fbgemm's AVX2/AVX-512 kernel is the one
fast int8 CPU path in the installed stack. ``torch.ao`` quantization is
deprecated, so its use is confined to this file: the quantized weight type is
built only to prepack the kernel's weight, and its deprecation warning (which a
user cannot act on) is silenced just there.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Largest int8 magnitude used: symmetric range [-127, 127] (-128 left unused).
QMAX = 127


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(int8 matrix, float32 scale per row)``.

    Per row because rows (output channels, vocabulary entries) differ in range
    by orders of magnitude: one scale for the whole matrix would flush small
    rows to zero. An all-zero row gets scale 1 (its int8 values are 0 anyway).
    """
    w = weight.detach().to(torch.float32)
    peak = w.abs().amax(dim=1)
    scale = torch.where(peak > 0, peak / QMAX, torch.ones_like(peak))
    q = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_rows(weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 matrix an int8 matrix and its row scales stand for."""
    return weight_int8.to(torch.float32) * scale[:, None]


class Int8DynamicLinear(nn.Module):
    """``y = x W^T + b`` with int8 weights and activations quantized per batch (CPU only).

    Activations are quantized on the fly to 7-bit unsigned (``reduce_range``):
    fbgemm's AVX2 kernel adds pairs of uint8 x int8 products in int16, which
    full 8-bit activations could overflow. The kernel's prepacked weight is
    rebuilt from the buffers after every ``load_state_dict``; it duplicates the
    int8 weight in memory (still half of the fp32 size).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        shape = (out_features, in_features)
        self.register_buffer("weight_int8", torch.zeros(shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: Any = None
        self._pack()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._pack())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8DynamicLinear:
        """The int8 version of a float ``nn.Linear`` (its weight quantized per output row)."""
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        module.weight_int8, module.weight_scale = quantize_rows(linear.weight)
        if linear.bias is not None:
            module.bias = linear.bias.detach().to(torch.float32).clone()
        module._pack()
        return module

    def _pack(self) -> None:
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
            qweight = torch._make_per_channel_quantized_tensor(
                self.weight_int8, self.weight_scale.double(), zero_points, 0
            )
            self._packed = torch.ops.quantized.linear_prepack(qweight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.to(torch.float32), self._packed, True)

    def __deepcopy__(self, memo: dict[int, Any]) -> Int8DynamicLinear:
        """A copy with its own prepacked weight (the kernel's handle cannot be deep-copied)."""
        copy = Int8DynamicLinear(self.in_features, self.out_features, bias=self.bias is not None)
        copy.load_state_dict(self.state_dict())
        return copy

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


class Int8Embedding(nn.Module):
    """A lookup table stored as int8 rows, dequantized for the looked-up rows only.

    Weight-only: only the few rows of a batch become float32, so the table
    costs a quarter of its fp32 memory and file size; lookups stay cheap.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        shape = (num_embeddings, embedding_dim)
        self.register_buffer("weight_int8", torch.zeros(shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        """The int8 version of a float ``nn.Embedding`` (one scale per vocabulary row)."""
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx)
        module.weight_int8, module.weight_scale = quantize_rows(embedding.weight)
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight_int8).to(torch.float32)
        return rows * self.weight_scale[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"
