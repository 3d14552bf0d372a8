"""The tokenizer of a checkpoint as llama.cpp reads it from GGUF metadata.

What a runtime needs to turn a chat into the same token ids the model was
trained on, and to stop where it learned to stop: the byte-level BPE
vocabulary and merges, each token's type (special tokens are CONTROL, so
``<|im_end|>`` typed in a prompt is one token and generation ends on it),
the pre-tokenizer's name (llama.cpp has no regex field: it picks its split
rules by name), BOS/EOS/end-of-turn/padding ids, whether to prepend BOS, and
the chat template the run trained with (``task.chat_template`` if set).

The pre-tokenizer is recognised from the tokenizer's own ``tokenizer.json``,
not assumed from the model's name: a tokenizer whose digits were never split
must be written as ``gpt-2`` even if its family usually splits them. Layouts
not recognised (SentencePiece-style Llama 2 / Mistral / TinyLlama, Llama 3's
regex, Qwen2's) are refused rather than guessed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tunesmith.errors import ConfigError
from tunesmith.tasks.chat_template import end_of_turn_id

_WHAT = "export --format gguf"
#: A chat whose rendering shows which token ends the assistant's turn.
PROBE_CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
#: A pre-tokenizer JSON with the keys that do not change the split left out.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}
#: llama.cpp's name for each pre-tokenizer layout recognised.
PRE_TOKENIZERS: dict[str, list[dict[str, Any]]] = {
    # GPT-2's regex over bytes; what SmolLM2's tokenizer becomes when read from GGUF.
    "gpt-2": [_BYTE_LEVEL],
    # Every digit on its own, then GPT-2's regex (SmolLM, SmolLM2, StarCoder).
    "smollm": [_DIGITS, _BYTE_LEVEL],
}


@dataclass(frozen=True)
class GgufVocab:
    """Everything of the tokenizer that goes into the GGUF metadata."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    #: ``bos``, ``eos``, ``eot``, ``unk``, ``pad`` -> token id (absent: none).
    special: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None

    def summary(self) -> dict[str, Any]:
        """What ``gguf.json`` says about the tokenizer (not the tokens themselves)."""
        info = asdict(self)
        for bulky in ("tokens", "token_types", "merges"):
            info.pop(bulky)
        info["special_tokens"] = {k: self.tokens[v] for k, v in self.special.items()}
        info |= {"vocab_size": len(self.tokens), "merges": len(self.merges)}
        return info


def build_vocab(tokenizer: Any, template: str | None, vocab_size: int) -> GgufVocab:
    """The GGUF vocabulary of a fast tokenizer, padded to the model's ``vocab_size`` rows.

    Args:
        tokenizer: The checkpoint's (fast) tokenizer.
        template: The chat template the run trained with (None: the model has none).
        vocab_size: Rows of the embedding matrix; ids beyond the tokenizer are unused.

    Raises:
        ConfigError: The tokenizer is not a byte-level BPE of a recognised layout,
            or it adds tokens other than BOS/EOS around a text.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = pre_tokenizer_name(spec)
    tokens, types = token_list(tokenizer, vocab_size)
    special = {
        key: int(value)
        for key, value in {
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "eot": end_of_turn(tokenizer, template),
            "unk": tokenizer.unk_token_id,
            "pad": tokenizer.pad_token_id,
        }.items()
        if value is not None
    }
    add_bos, add_eos = added_around(tokenizer)
    return GgufVocab(
        tokens=tokens,
        token_types=types,
        merges=merge_list(spec["model"].get("merges") or []),
        pre=pre,
        special=special,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=template,
    )


def end_of_turn(tokenizer: Any, template: str | None) -> int | None:
    """The token the template ends an assistant reply with (None without a template)."""
    return end_of_turn_id(tokenizer, PROBE_CHAT, template) if template else None


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's split rules, read off ``tokenizer.json``.

    Raises:
        ConfigError: Not a byte-level BPE, or a pre-tokenizer with no known name.
    """
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer"):
        raise ConfigError(
            f"{_WHAT}: the tokenizer is not a byte-level BPE (SentencePiece-style tokenizers "
            "such as Llama 2's, Mistral's or TinyLlama's are not supported); supported: "
            "byte-level BPE with a GPT-2 or SmolLM pre-tokenizer"
        )
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for name, layout in PRE_TOKENIZERS.items():
        if len(steps) == len(layout) and all(
            all(step.get(k) == v for k, v in want.items())
            for step, want in zip(steps, layout, strict=True)
        ):
            return name
    raise ConfigError(
        f"{_WHAT}: pre-tokenizer {json.dumps(pre)[:160]} is not recognised (Llama 3, Qwen2 "
        f"and others are not supported yet); supported: {', '.join(PRE_TOKENIZERS)}"
    )


def token_list(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types by id, as llama.cpp's converter writes them.

    Special added tokens are CONTROL, other added tokens USER_DEFINED, ids
    the tokenizer does not use (embedding rows beyond it) UNUSED ``[PADn]``.
    """
    from gguf import TokenType

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif i in added:
            tokens.append(by_id[i])
            types.append(int(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(TokenType.NORMAL))
    if len(by_id) > vocab_size:
        raise ConfigError(
            f"{_WHAT}: the tokenizer has {len(by_id)} tokens but the model only "
            f"{vocab_size} embedding rows"
        )
    return tokens, types


def merge_list(merges: Sequence[str | Sequence[str]]) -> list[str]:
    """Merges as ``"a b"`` strings (newer ``tokenizer.json`` files store pairs)."""
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def added_around(tokenizer: Any) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS before and EOS after a text (GGUF's add-BOS/EOS flags).

    Raises:
        ConfigError: It adds other tokens, which GGUF cannot say.
    """
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    add_bos = bool(full[:1]) and full[:1] == [tokenizer.bos_token_id] and full[1:2] == bare[:1]
    add_eos = bool(full) and full[-1:] == [tokenizer.eos_token_id] and len(full) > len(bare)
    if len(full) != len(bare) + add_bos + add_eos:
        raise ConfigError(
            f"{_WHAT}: the tokenizer adds tokens other than BOS/EOS around a text "
            f"({full} for {bare}); GGUF can only say add-BOS and add-EOS"
        )
    return add_bos, add_eos
