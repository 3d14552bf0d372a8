"""Writing a Llama model and its tokenizer as one GGUF file with the ``gguf`` library.

The storage types follow llama.cpp's converter: norms and other 1-D tensors
stay float32 (llama.cpp's kernels expect them so), everything else takes the
requested type, and a q8_0 matrix whose rows do not split into 32-value
blocks falls back to float16. ``rounded`` gives the values a tensor holds
once stored, which is what check 1 compares the file against.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.deploy.gguf_tensors import ARCHITECTURE, LlamaShape
from tunesmith.deploy.gguf_vocab import GgufVocab
from tunesmith.errors import ConfigError

#: The ``--quantize`` values GGUF export takes.
QUANTIZE_CHOICES = ("f32", "f16", "q8_0")
DEFAULT_QUANTIZE = "f16"


@dataclass(frozen=True)
class Quant:
    """A ``--quantize`` choice: the GGML type of the matrices and the file type it declares."""

    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    file_type: Any  # gguf.LlamaFileType


def quant(name: str) -> Quant:
    """The ``Quant`` of a ``--quantize`` value.

    Raises:
        ConfigError: An unknown value (naming the ones taken).
    """
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    table = {
        "f32": (Q.F32, F.ALL_F32),
        "f16": (Q.F16, F.MOSTLY_F16),
        "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
    }
    if name not in table:
        raise ConfigError(
            f"export --format gguf: unknown --quantize '{name}'; use {', '.join(table)}"
        )
    return Quant(name, *table[name])


def stored_type(name: str, array: np.ndarray, q: Quant) -> Any:
    """The GGML type ``name`` is stored in (llama.cpp's converter's rules)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if array.ndim <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    block = GGML_QUANT_SIZES[q.qtype][0]
    if array.shape[-1] % block:
        return Q.F16
    return q.qtype


def encode(name: str, array: np.ndarray, q: Quant) -> tuple[np.ndarray, Any]:
    """The bytes (or float array) stored for a tensor, and their GGML type."""
    from gguf import quants

    qtype = stored_type(name, array, q)
    return quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype), qtype


def rounded(name: str, array: np.ndarray, q: Quant) -> np.ndarray:
    """``array`` as the file holds it, read back to float32 (what a reader computes with)."""
    from gguf import quants

    data, qtype = encode(name, array, q)
    return quants.dequantize(data, qtype).reshape(array.shape).astype(np.float32, copy=False)


def write_gguf(
    path: Path,
    shape: LlamaShape,
    tensors: Iterable[tuple[str, np.ndarray]],
    vocab: GgufVocab,
    q: Quant,
    *,
    name: str,
) -> dict[str, int]:
    """Write the GGUF file; returns how many tensors were stored in each GGML type."""
    import gguf

    writer = gguf.GGUFWriter(path, ARCHITECTURE)
    writer.add_name(name)
    writer.add_file_type(int(q.file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_shape(writer, shape)
    add_vocab(writer, vocab)
    types: dict[str, int] = {}
    for tensor_name, array in tensors:
        data, qtype = encode(tensor_name, array, q)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def _add_shape(writer: Any, shape: LlamaShape) -> None:
    """The ``llama.*`` hyper-parameters."""
    writer.add_context_length(shape.n_ctx)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(shape.vocab_size)
    if shape.head_dim * shape.n_head != shape.n_embd:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)


def add_vocab(writer: Any, vocab: GgufVocab) -> None:
    """The ``tokenizer.*`` metadata: byte-level BPE, special ids, flags, chat template."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    setters = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "eot": writer.add_eot_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for key, token_id in vocab.special.items():
        setters[key](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
