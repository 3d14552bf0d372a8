"""Check 1 of a GGUF export: the file, read back without llama.cpp, is the trained model.

Why transformers' GGUF loader: it is an independent reader (its own name
table, its own inverse of the Q/K permutation, the ``gguf`` library's
de-quantisation), always installed, and it computes in float32 exactly as the
trained model does. So with the same weights the logits must agree to float
noise: a missing permutation, a swapped or transposed tensor, a wrong norm
epsilon or RoPE base all show up as large differences.

f16 and q8_0 files cannot equal the float32 model, so they are compared with
the trained model whose weights were rounded the same way (``gguf_write.rounded``:
the same storage type per tensor, the same q8_0 blocks); how far the rounding
itself moves the logits is reported beside it.

The metadata is checked against the trained tokenizer, not against what the
writer meant to write: EOS, BOS and end-of-turn ids, the chat template, the
pre-tokenizer name and every token string.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.deploy.gguf_prompts import CheckPrompt
from tunesmith.deploy.gguf_tensors import LlamaShape, gguf_names
from tunesmith.deploy.gguf_vocab import end_of_turn, pre_tokenizer_name
from tunesmith.deploy.gguf_write import Quant, rounded

#: Largest |logit difference| between the file (as transformers reads it) and the model.
LOGITS_ATOL = 1e-4


@dataclass
class FileCheck:
    """What check 1 found."""

    atol: float
    #: Largest |file - model with the file's rounding| over every position of every prompt.
    max_abs_diff: float = 0.0
    #: Largest |model with the file's rounding - trained model| (0 for f32): the rounding's cost.
    rounding_max_abs_diff: float = 0.0
    prompts: int = 0
    #: Metadata that disagrees with the trained tokenizer, in words.
    metadata_problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.metadata_problems and self.max_abs_diff <= self.atol

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def failure(self) -> str:
        """Why it failed, in one line."""
        if self.metadata_problems:
            return "; ".join(self.metadata_problems)
        return (
            f"transformers reads logits {self.max_abs_diff:.3g} away from the trained model's "
            f"(tolerance {self.atol:g}): tensors are misplaced or mislaid"
        )


def metadata_problems(path: Path, tokenizer: Any, template: str | None) -> list[str]:
    """Where the file's tokenizer metadata disagrees with the trained tokenizer."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields

    def value(key: str) -> Any:
        found = fields.get(key)
        return None if found is None else found.contents()

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    expected = {
        "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.ggml.eot_token_id": end_of_turn(tokenizer, template),
        "tokenizer.ggml.pre": pre_tokenizer_name(spec),
        "tokenizer.chat_template": template,
    }
    problems = [
        f"{key} is {_short(value(key))}, the trained tokenizer's is {_short(want)}"
        for key, want in expected.items()
        if value(key) != want
    ]
    tokens = value("tokenizer.ggml.tokens") or []
    wrong = [t for t, i in tokenizer.get_vocab().items() if i >= len(tokens) or tokens[i] != t]
    if wrong:
        problems.append(
            f"{len(wrong)} token strings differ from the tokenizer's ({wrong[0]!r} ...)"
        )
    return problems


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def rounded_model(model: nn.Module, shape: LlamaShape, q: Quant) -> nn.Module:
    """A copy of ``model`` whose written weights hold what the file holds (f32: the model)."""
    if q.name == "f32":
        return model
    copied = copy.deepcopy(model)
    state = copied.state_dict()
    with torch.no_grad():
        for hf_name, name in gguf_names(state, shape):
            param = copied.get_parameter(hf_name)
            values = rounded(name, param.detach().float().numpy(), q)
            param.copy_(torch.from_numpy(values))
    return copied


def load_file_model(path: Path) -> nn.Module:
    """The GGUF file as transformers' GGUF loader reads it, float32, in eval mode."""
    from transformers import AutoModelForCausalLM

    # Marked as quantized by transformers (its ``.float()`` refuses), yet float32 throughout.
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    ).eval()


def check_file(
    path: Path,
    model: nn.Module,
    tokenizer: Any,
    template: str | None,
    prompts: Sequence[CheckPrompt],
    shape: LlamaShape,
    q: Quant,
) -> tuple[FileCheck, nn.Module]:
    """Check 1: metadata against the tokenizer, logits against the (rounded) trained model.

    Returns:
        The result, and the model transformers read from the file (check 2
        compares llama.cpp with it).
    """
    result = FileCheck(atol=LOGITS_ATOL, prompts=len(prompts))
    result.metadata_problems = metadata_problems(path, tokenizer, template)
    loaded = load_file_model(path)
    reference = rounded_model(model, shape, q)
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt.text)["input_ids"]])
            read, wanted = loaded(ids).logits[0], reference(ids).logits[0]
            result.max_abs_diff = max(result.max_abs_diff, _max_diff(read, wanted))
            if reference is not model:
                trained = model(ids).logits[0]
                result.rounding_max_abs_diff = max(
                    result.rounding_max_abs_diff, _max_diff(wanted, trained)
                )
    return result, loaded


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b|; inf where either is not finite (a broken file must not pass)."""
    diff = (a - b).abs()
    return float("inf") if not torch.isfinite(diff).all() else float(diff.max())
