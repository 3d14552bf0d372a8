"""llama.cpp, through llama-cpp-python, as check 2 of a GGUF export uses it.

Why check with the runtime itself: transformers' reader (check 1) proves the
tensors, but only llama.cpp's own tokenizer proves the vocabulary, merges,
pre-tokenizer name and token types (it picks its split rules by name), and
only its own notion of end-of-generation proves that a chat will stop. The
wrapper is small on purpose: tokenise as a server does (special tokens
parsed, BOS as the metadata says), last-position logits, greedy decoding
that stops where llama.cpp says generation ends.

llama-cpp-python is optional (``pip install tunesmith[gguf]``); without it
check 2 is skipped and the report says so.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np


def runtime_available() -> bool:
    """Whether llama-cpp-python is installed (checked without importing it)."""
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCpp:
    """One GGUF file loaded in llama.cpp on the CPU, with logits kept for every position."""

    def __init__(self, path: Path, *, n_ctx: int, threads: int | None = None) -> None:
        import llama_cpp

        self._api = llama_cpp
        # A float32 key/value cache (llama.cpp's default is f16): the check is about the
        # file, so the cache must not round what transformers keeps in float32.
        self._llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            logits_all=True,
            verbose=False,
            seed=0,
            n_threads=threads,
            n_gpu_layers=0,
            type_k=llama_cpp.GGML_TYPE_F32,
            type_v=llama_cpp.GGML_TYPE_F32,
        )
        # llama-cpp-python has no public handle on the vocabulary the C API asks for.
        self._vocab = self._llm._model.vocab

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._llm.close()

    @property
    def add_bos(self) -> bool:
        """Whether llama.cpp prepends BOS to a prompt (read from the file's metadata)."""
        return bool(self._api.llama_vocab_get_add_bos(self._vocab))

    @property
    def metadata(self) -> dict[str, Any]:
        """The file's key/value metadata as llama.cpp read it (values as strings)."""
        return dict(self._llm.metadata)

    def tokenize(self, text: str) -> list[int]:
        """``text`` as a server tokenises a rendered chat: special tokens parsed, BOS as set."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=self.add_bos, special=True))

    def is_eog(self, token: int) -> bool:
        """Whether llama.cpp ends generation at ``token`` (EOS, EOT and the like)."""
        return bool(self._api.llama_vocab_is_eog(self._vocab, token))

    def last_logits(self, ids: list[int]) -> np.ndarray:
        """The next-token logits after ``ids`` (a fresh context each time)."""
        self._llm.reset()
        self._llm.eval(ids)
        return np.array(self._llm.scores[self._llm.n_tokens - 1], dtype=np.float32)

    def greedy(self, ids: list[int], max_new: int) -> list[int]:
        """Up to ``max_new`` greedy tokens after ``ids``, the end-of-generation token included."""
        logits = self.last_logits(ids)
        out: list[int] = []
        for _ in range(max_new):
            token = int(np.argmax(logits))
            out.append(token)
            if self.is_eog(token):
                break
            self._llm.eval([token])
            logits = self._llm.scores[self._llm.n_tokens - 1]
        return out
