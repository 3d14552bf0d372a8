"""A Llama checkpoint's tensors under llama.cpp's names and in its layout.

Why not a plain rename: llama.cpp applies rotary embeddings to interleaved
pairs of each head's dimensions, transformers' Llama to its two halves
(``rotate_half``), so the rows of the query and key projections must be
reordered per head exactly as llama.cpp's own ``convert_hf_to_gguf.py`` does
(transformers' GGUF loader undoes the same permutation when it reads a file).
Skip it and the file still loads everywhere, but every attention score is
wrong: check 1 catches that. The names come from ``gguf``'s own table for the
``llama`` architecture, so they are llama.cpp's, not ours.

Only plain Llama models are taken (SmolLM/SmolLM2 and other ``LlamaForCausalLM``
checkpoints with byte-level BPE tokenizers); RoPE scaling (Llama 3.1 and later),
biases in attention or MLP, and other architectures (Qwen2, Mistral, Gemma ...)
are refused before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tunesmith.errors import ConfigError, ModelError

#: The one llama.cpp architecture written.
ARCHITECTURE = "llama"
#: Buffers that are computed, not learned (older transformers saved them).
_COMPUTED = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class LlamaShape:
    """The hyper-parameters llama.cpp reads from a ``llama`` GGUF file."""

    n_layers: int
    n_ctx: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    vocab_size: int
    tied: bool

    @classmethod
    def of(cls, config: Any) -> LlamaShape:
        """Read from a transformers ``LlamaConfig``, after ``check_architecture``."""
        heads = config.num_attention_heads
        return cls(
            n_layers=config.num_hidden_layers,
            n_ctx=config.max_position_embeddings,
            n_embd=config.hidden_size,
            n_ff=config.intermediate_size,
            n_head=heads,
            n_head_kv=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            rms_eps=float(config.rms_norm_eps),
            rope_theta=float(_rope(config).get("rope_theta", getattr(config, "rope_theta", 1e4))),
            vocab_size=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
        )


def _rope(config: Any) -> dict[str, Any]:
    """The RoPE settings, under either name transformers has used for them."""
    return dict(
        getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    )


def check_architecture(config: Any) -> None:
    """Refuse models this writer cannot lay out faithfully, naming what works.

    Raises:
        ConfigError: Not a Llama model, or a Llama variant with RoPE scaling or biases.
    """
    what = "export --format gguf"
    model_type = getattr(config, "model_type", None)
    if model_type != ARCHITECTURE:
        raise ConfigError(
            f"{what}: model type '{model_type}' is not supported; GGUF export writes "
            "Llama-architecture models (LlamaForCausalLM, e.g. SmolLM/SmolLM2) with byte-level "
            "BPE tokenizers; use --merge and llama.cpp's convert_hf_to_gguf.py for others"
        )
    rope_type = _rope(config).get("rope_type", _rope(config).get("type", "default"))
    if rope_type not in (None, "default"):
        raise ConfigError(
            f"{what}: RoPE scaling '{rope_type}' (Llama 3.1 and later) is not written; "
            "only Llama models with plain RoPE are supported"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ConfigError(f"{what}: Llama models with attention or MLP biases are not supported")


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's rows from halves to interleaved pairs (llama.cpp's rotary layout).

    Args:
        weight: A query or key projection, ``(n_head * head_dim, hidden)``.
        n_head: Heads of that projection (the key/value heads for the key).
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_names(names: Iterable[str], shape: LlamaShape) -> Iterator[tuple[str, str]]:
    """``(transformers name, llama.cpp name)`` of every learned tensor written.

    A tied ``lm_head`` is left out: llama.cpp reuses ``token_embd`` for the
    output when ``output.weight`` is missing, as it does for files of its own
    converter.

    Raises:
        ModelError: A tensor llama.cpp's ``llama`` architecture has no name for.
    """
    import gguf

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, shape.n_layers)
    for hf_name in names:
        if hf_name.endswith(_COMPUTED) or (shape.tied and hf_name == "lm_head.weight"):
            continue
        name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(
                f"export --format gguf: tensor '{hf_name}' has no llama.cpp name; "
                "only plain Llama models are supported"
            )
        yield hf_name, name


def llama_tensors(
    state: Mapping[str, torch.Tensor], shape: LlamaShape
) -> Iterator[tuple[str, np.ndarray]]:
    """``(llama.cpp name, float32 array)`` for every tensor written, Q/K permuted."""
    for hf_name, name in gguf_names(state, shape):
        data = state[hf_name].detach().to(device="cpu", dtype=torch.float32)
        if hf_name.endswith("q_proj.weight"):
            data = permute_qk(data, shape.n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_qk(data, shape.n_head_kv)
        yield name, data.numpy()
