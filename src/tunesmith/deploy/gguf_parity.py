"""Check 2 of a GGUF export: llama.cpp runs the file as transformers runs the same weights.

Per check prompt, against the model transformers read from the file (check 1
proved it equals the trained model with the file's rounding):

(a) the prompt's token ids, from llama.cpp's tokenizer (special tokens parsed,
    BOS as the metadata says) and from the trained tokenizer: identical for
    every prompt, or the export fails;
(b) the last-position logits, within a tolerance per storage type: llama.cpp's
    CPU kernels multiply f16 and q8_0 matrices with activations rounded to
    f16 or to 8-bit blocks, so the tolerance grows with the rounding;
(c) greedy continuations of up to ``GREEDY_TOKENS`` tokens: identical on at
    least ``GREEDY_MIN_SHARE`` of the prompts for f32 and f16 (the first
    divergence is reported for the rest); q8_0 is reported, not required;
(d) the end-of-turn and EOS tokens end generation in llama.cpp, and the
    report counts the prompts where both runtimes stop at the same place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.deploy.gguf_prompts import CheckPrompt
from tunesmith.deploy.gguf_runtime import LlamaCpp

#: Largest |last-position logit difference| allowed between llama.cpp and transformers.
RUNTIME_ATOL = {"f32": 1e-3, "f16": 0.1, "q8_0": 2.0}
#: Share of prompts whose greedy continuations must be identical (f32 and f16).
GREEDY_MIN_SHARE = 0.9
#: Greedy tokens generated per prompt (fewer when the model stops).
GREEDY_TOKENS = 32
#: Storage types whose greedy agreement is reported but not required.
_GREEDY_REPORTED_ONLY = ("q8_0",)


@dataclass
class PromptParity:
    """Both runtimes on one check prompt."""

    source: str
    prompt_tokens: int
    tokens_equal: bool
    logits_max_abs_diff: float | None = None
    greedy_equal: bool | None = None
    #: Index of the first differing greedy token, and both tokens from there (when they differ).
    first_divergence: dict[str, Any] | None = None
    #: Whether transformers' greedy output ended with an end-of-turn/EOS token, and llama.cpp's.
    stopped: dict[str, bool] = field(default_factory=dict)


@dataclass
class RuntimeCheck:
    """What check 2 found."""

    quantize: str
    atol: float
    #: The stop tokens (EOS, end of turn) that llama.cpp ends generation at, and those it does not.
    stops_end_generation: dict[str, bool]
    prompts: list[PromptParity] = field(default_factory=list)

    @property
    def tokens_equal(self) -> int:
        return sum(p.tokens_equal for p in self.prompts)

    @property
    def logits_max_abs_diff(self) -> float:
        return max((p.logits_max_abs_diff or 0.0 for p in self.prompts), default=0.0)

    @property
    def greedy_equal(self) -> int:
        return sum(bool(p.greedy_equal) for p in self.prompts)

    @property
    def stops(self) -> tuple[int, int]:
        """Prompts where transformers stopped; of those, where llama.cpp stopped identically."""
        hf = [p for p in self.prompts if p.stopped.get("transformers")]
        return len(hf), sum(bool(p.greedy_equal) and p.stopped.get("llama_cpp", False) for p in hf)

    def problems(self) -> list[str]:
        """Each failed requirement, in words (empty: passed)."""
        n = len(self.prompts)
        found = []
        if self.tokens_equal < n:
            bad = next(p.source for p in self.prompts if not p.tokens_equal)
            found.append(
                f"llama.cpp tokenises {n - self.tokens_equal}/{n} prompts differently ({bad})"
            )
        if self.logits_max_abs_diff > self.atol:
            found.append(
                f"llama.cpp's logits are {self.logits_max_abs_diff:.3g} away from transformers' "
                f"(tolerance {self.atol:g} for {self.quantize})"
            )
        if self.quantize not in _GREEDY_REPORTED_ONLY and self.greedy_equal < GREEDY_MIN_SHARE * n:
            found.append(f"greedy output identical on only {self.greedy_equal}/{n} prompts")
        never = [name for name, ends in self.stops_end_generation.items() if not ends]
        if never:
            found.append(f"llama.cpp does not end generation at {', '.join(never)}")
        return found

    def as_dict(self) -> dict[str, Any]:
        n = len(self.prompts)
        stopped, same = self.stops
        return {
            "passed": not self.problems(),
            "problems": self.problems(),
            "quantize": self.quantize,
            "prompt_tokens_identical": f"{self.tokens_equal}/{n}",
            "last_logits_max_abs_diff": self.logits_max_abs_diff,
            "last_logits_atol": self.atol,
            "greedy_identical": f"{self.greedy_equal}/{n}",
            "greedy_min_share": None
            if self.quantize in _GREEDY_REPORTED_ONLY
            else GREEDY_MIN_SHARE,
            "eot_stops": f"{same}/{stopped}",
            "stops_end_generation": self.stops_end_generation,
            "prompts": [asdict(p) for p in self.prompts],
        }


def hf_greedy(model: nn.Module, ids: list[int], stops: set[int], max_new: int) -> list[int]:
    """Up to ``max_new`` greedy tokens from transformers, the stop token included."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=sorted(stops),
        pad_token_id=min(stops),
    )
    inputs = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            inputs, attention_mask=torch.ones_like(inputs), generation_config=config
        )
    return [int(t) for t in out[0, len(ids) :]]


def compare_prompt(
    runtime: LlamaCpp, model: nn.Module, prompt: CheckPrompt, hf_ids: list[int], stops: set[int]
) -> PromptParity:
    """(a)-(d) for one prompt; logits and greedy only when the token ids agree."""
    cpp_ids = runtime.tokenize(prompt.text)
    result = PromptParity(prompt.source, len(hf_ids), cpp_ids == hf_ids)
    if not result.tokens_equal:
        return result
    with torch.no_grad():
        hf_logits = model(torch.tensor([hf_ids])).logits[0, -1]
    cpp_logits = torch.from_numpy(runtime.last_logits(hf_ids))
    result.logits_max_abs_diff = float((hf_logits - cpp_logits).abs().max())
    hf_out = hf_greedy(model, hf_ids, stops, GREEDY_TOKENS)
    cpp_out = runtime.greedy(hf_ids, GREEDY_TOKENS)
    result.greedy_equal = hf_out == cpp_out
    result.stopped = {
        "transformers": bool(hf_out) and hf_out[-1] in stops,
        "llama_cpp": bool(cpp_out) and runtime.is_eog(cpp_out[-1]),
    }
    if not result.greedy_equal:
        at = next(
            (i for i, (a, b) in enumerate(zip(hf_out, cpp_out, strict=False)) if a != b),
            min(len(hf_out), len(cpp_out)),
        )
        result.first_divergence = {
            "index": at,
            "transformers": hf_out[at : at + 4],
            "llama_cpp": cpp_out[at : at + 4],
        }
    return result


def check_runtime(
    path: Path,
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[CheckPrompt],
    stops: dict[str, int],
    *,
    quantize: str,
    n_ctx_train: int,
    threads: int | None = None,
) -> RuntimeCheck:
    """Check 2 on every prompt: ``model`` is the file as transformers read it (check 1).

    Args:
        stops: The tokens generation must end at, by name (``eos``, ``eot``).
    """
    encoded = [tokenizer(p.text)["input_ids"] for p in prompts]
    longest = max((len(ids) for ids in encoded), default=0)
    n_ctx = min(n_ctx_train, max(64, longest + GREEDY_TOKENS + 8))
    with LlamaCpp(path, n_ctx=n_ctx, threads=threads) as runtime:
        ends = {
            f"{name} ({tokenizer.convert_ids_to_tokens(i)})": runtime.is_eog(i)
            for name, i in stops.items()
        }
        result = RuntimeCheck(quantize, RUNTIME_ATOL[quantize], ends)
        stop_ids = set(stops.values())
        for prompt, ids in zip(prompts, encoded, strict=True):
            result.prompts.append(compare_prompt(runtime, model, prompt, ids, stop_ids))
    return result
