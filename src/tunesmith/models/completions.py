"""What a batched generation is asked for and what it returns.

The shapes follow OpenAI's completion API, because the server that will sit on
top of the generator speaks it, and they carry what online RL needs: ``n``
completions per prompt, the exact token ids (the EOS token included, so a
trainer can teach the model to stop) and, on request, the log-probability of
every sampled token.

``CompletionState`` follows one completion while it is decoded and decides
when it is finished: an end-of-sequence token, a stop string (found in the
decoded text, so one that spans several tokens is found too) or its token
budget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from tunesmith.errors import GenerationError

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete, with its own settings.

    Attributes:
        prompt: Token ids, or text tokenized as is (no special tokens added: a
            chat template already wrote them; see ``chat_prompt_ids``).
        max_new_tokens: The most tokens one completion may have.
        temperature: 0 is greedy (the arg-max, as ``do_sample=False``); above 0 samples.
        top_k: Sample among the k most likely tokens only (0: all).
        top_p: Sample among the most likely tokens whose probability reaches p (1.0: all).
        stop: Strings that end a completion; the text is cut before the first one.
        stop_token_ids: Token ids that end a completion, on top of the model's EOS.
        n: Completions of this prompt (sampled independently; greedy ones are equal).
        seed: Seeds this request's random generator: the same request samples
            the same completions whatever else is in the batch.
        generator: A random generator to draw from instead of ``seed`` (e.g. one per RL run).
        logprobs: Return each chosen token's log-probability.
        ignore_eos: Do not end at the model's end-of-sequence tokens (RL rollouts of a
            fixed length); stop strings and ``stop_token_ids`` still end it.
        adapter: The peft LoRA adapter that completes this request (a model holding
            several adapters serves a batch of requests for different adapters in
            one forward: peft's ``adapter_names``); None: the model as it is.
        on_text: Streaming: called as ``on_text(row, delta)`` whenever completion
            ``row`` (0..n-1) has new final text. Text that might still become a stop
            string or an incomplete character is held back, so the deltas joined
            are exactly the completion's ``text``; the last call has ``delta`` ""
            when there is nothing left to say and the completion is finished.
    """

    prompt: str | Sequence[int]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    n: int = 1
    seed: int | None = None
    generator: torch.Generator | None = field(default=None, compare=False, repr=False)
    logprobs: bool = False
    ignore_eos: bool = False
    adapter: str | None = None
    on_text: Callable[[int, str], None] | None = field(default=None, compare=False, repr=False)

    def problems(self) -> list[str]:
        """What is wrong with the settings, one phrase each (empty when the request is valid)."""
        checks = [
            (
                self.max_new_tokens >= 1,
                f"max_new_tokens must be at least 1, got {self.max_new_tokens}",
            ),
            (
                self.temperature >= 0,
                f"temperature must be 0 (greedy) or more, got {self.temperature}",
            ),
            (self.top_k >= 0, f"top_k must be 0 (off) or more, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (all(self.stop), "stop strings must not be empty"),
            (self.seed is None or self.generator is None, "give seed or generator, not both"),
            (not isinstance(self.stop, str), "stop must be a list of strings, not one string"),
        ]
        return [message for ok, message in checks if not ok]

    def random_generator(self) -> torch.Generator:
        """The generator this request draws from: its own, seeded, or seeded from torch's RNG.

        Seeding from the global RNG keeps unseeded requests reproducible under
        ``torch.manual_seed``, as ``model.generate`` is.
        """
        if self.generator is not None:
            return self.generator
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class Completion:
    """One generated continuation of a prompt.

    Attributes:
        token_ids: Every generated token, the one that ended it included (EOS,
            or the token that completed a stop string).
        text: The decoded text, special tokens left out, cut before the stop string.
        finish_reason: ``stop`` (EOS, a stop token or a stop string) or ``length``.
        stopped_by: The stop string or token id that ended it; None at ``length``.
        logprobs: Log-probability of each token of ``token_ids`` (when asked for).
    """

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    stopped_by: str | int | None = None
    logprobs: list[float] | None = None


@dataclass(frozen=True)
class GenerationResult:
    """The ``n`` completions of one request, in the order of the request's rows."""

    prompt_ids: list[int]
    completions: list[Completion]

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the prompt (counted once, whatever ``n``)."""
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        """Generated tokens over all completions."""
        return sum(len(c.token_ids) for c in self.completions)


def encode_prompt(tokenizer: Any, prompt: str | Sequence[int]) -> list[int]:
    """The prompt's token ids (text tokenized as is, without added special tokens)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return [int(t) for t in prompt]


def chat_prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template, ready for the reply."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return encode_prompt(tokenizer, text)


def check_request(
    request: GenerationRequest, prompt_ids: Sequence[int], max_positions: int | None
) -> None:
    """Raise ``GenerationError`` naming every problem of ``request``."""
    problems = request.problems()
    if not prompt_ids:
        problems.append("the prompt is empty")
    total = len(prompt_ids) + request.max_new_tokens
    if max_positions is not None and total > max_positions:
        problems.append(
            f"prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({request.max_new_tokens}) "
            f"exceeds the model's {max_positions} positions"
        )
    if problems:
        raise GenerationError("generation request refused: " + "; ".join(problems))


def _stop_prefix_at_end(text: str, stop: str) -> int:
    """Length of the longest proper start of ``stop`` that ``text`` ends with (0: none)."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


class CompletionState:
    """One completion being decoded: its tokens so far and whether it is finished.

    Args:
        request: The request it completes (budget, stop strings, stop tokens).
        eos_ids: The model's end-of-sequence ids.
        tokenizer: Decodes the tokens to look for stop strings and for the final text.
        row: Which of the request's ``n`` completions this is (for streaming).
    """

    def __init__(
        self, request: GenerationRequest, eos_ids: frozenset[int], tokenizer: Any, row: int = 0
    ) -> None:
        self.request = request
        self.row = row
        self._streamed = 0  # characters of the text already handed to ``on_text``
        ends = frozenset() if request.ignore_eos else eos_ids
        self.stop_ids = ends | frozenset(request.stop_token_ids)
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.logprobs: list[float] | None = [] if request.logprobs else None
        self.finish_reason: FinishReason | None = None
        self.stopped_by: str | int | None = None
        self._cut: int | None = None  # where a stop string starts in the text

    @property
    def finished(self) -> bool:
        """A stop token, a stop string or the budget ended it."""
        return self.finish_reason is not None

    def add(self, token: int, logprob: float | None = None) -> bool:
        """Record the next token; True when it finished the completion."""
        self.token_ids.append(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        if token in self.stop_ids:
            self.finish_reason, self.stopped_by = "stop", token
        elif self.request.stop and self._find_stop():
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.request.max_new_tokens:
            self.finish_reason = "length"
        if self.request.on_text is not None:
            self._stream()
        return self.finished

    def _stream(self) -> None:
        """Hand the new final text to ``on_text``; all that is left once finished.

        Until the completion finishes, a trailing replacement character (a
        character whose bytes are still arriving) and the longest end of the
        text that begins a stop string are held back: they may still change.
        """
        if self.finished:
            text = self.result().text
            delta = text[self._streamed :]
            self._streamed = len(text)
            self.request.on_text(self.row, delta)  # type: ignore[misc]
            return
        text = self._decode()
        settled = text.rstrip("\ufffd")
        held = max((_stop_prefix_at_end(settled, stop) for stop in self.request.stop), default=0)
        end = len(settled) - held
        if end > self._streamed:
            delta = text[self._streamed : end]
            self._streamed = end
            self.request.on_text(self.row, delta)  # type: ignore[misc]

    def _find_stop(self) -> bool:
        """Look for the stop strings in the whole text so far (a token may end one mid-token)."""
        text = self._decode()
        found = [(i, s) for s in self.request.stop if (i := text.find(s)) >= 0]
        if not found:
            return False
        self._cut, self.stopped_by = min(found)
        return True

    def _decode(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def result(self) -> Completion:
        """The finished completion (text cut before the stop string)."""
        if self.finish_reason is None:
            raise RuntimeError("completion read before it finished")
        text = self._decode()
        if self._cut is not None:
            text = text[: self._cut]
        return Completion(
            token_ids=list(self.token_ids),
            text=text,
            finish_reason=self.finish_reason,
            stopped_by=self.stopped_by,
            logprobs=self.logprobs,
        )
