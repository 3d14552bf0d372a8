"""Batched generation: many prompts at once, each with its own settings.

``Generator(model, tokenizer).generate(requests)`` completes a list of
``GenerationRequest`` (prompt, token budget, sampling settings, stop strings,
``n`` completions) and returns one ``GenerationResult`` per request. It is
the engine under RL rollouts (several sampled completions per prompt, their
log-probabilities) and under the completion server (many requests, each with
its own settings), so it lives in the lowest layer both can import.

How a batch is generated, and why (``GeneratorOptions`` turns each lever off
for the benchmark):

1. The prompts are left-padded into one batch and prefilled in one forward
   pass, the LM head on the last position only (over every prompt position a
   49k-token head costs as much as the rest of the model).
2. Each prompt is prefilled once; its ``n`` completion rows share that work
   by copying its cache rows.
3. Every step decodes one token per unfinished row with the KV cache,
   preallocated to the longest sequence so that no step copies it.
4. Rows that finish (EOS, stop string, their own token budget) leave the
   batch, cache included: the others stop paying for them, which
   ``model.generate`` cannot do (it runs every row to the longest budget).
5. Optionally a static cache and ``torch.compile`` of the decoding step
   (off by default: it did not pay on CPU, see docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from tunesmith.errors import GenerationError
from tunesmith.models.completions import (
    Completion,
    CompletionState,
    GenerationRequest,
    GenerationResult,
    chat_prompt_ids,
    check_request,
    encode_prompt,
)
from tunesmith.models.decoding import (
    BatchDecoder,
    GenerationStats,
    GeneratorOptions,
    ModelRunner,
    PaddedPrompts,
    static_capacity,
)
from tunesmith.models.sampling import Sampler

#: One import for users: the generator and what goes in and comes out.
__all__ = [
    "Completion",
    "GenerationRequest",
    "GenerationResult",
    "GenerationStats",
    "Generator",
    "GeneratorOptions",
    "chat_prompt_ids",
    "eos_token_ids",
]


class Generator:
    """Batched generation with a decoder-only transformers model.

    Args:
        model: A causal LM (``AutoModelForCausalLM``); in eval mode while it generates.
        tokenizer: Its tokenizer (text prompts, stop strings, the returned text).
        options: How to decode; the defaults are the fastest measured on CPU.
    """

    def __init__(self, model: Any, tokenizer: Any, options: GeneratorOptions | None = None) -> None:
        self.options = options or GeneratorOptions()
        if problems := self.options.problems():
            raise GenerationError("generator options refused: " + "; ".join(problems))
        if getattr(model.config, "is_encoder_decoder", False):
            raise GenerationError("the batched generator serves decoder-only models only")
        if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
            raise GenerationError(
                "the batched generator cannot run prefix or prompt tuning: peft feeds those "
                "their virtual tokens through the cache the generator keeps"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids, default=0))
        self.max_positions: int | None = getattr(model.config, "max_position_embeddings", None)
        self.runner = ModelRunner(model, self.options)

    @property
    def stats(self) -> GenerationStats:
        """Time spent prefilling, decoding and compiling, and the decoding work, over all calls."""
        return self.runner.stats

    def generate(self, requests: Sequence[GenerationRequest | str]) -> list[GenerationResult]:
        """One result per request, in order; each holds the request's ``n`` completions.

        A plain string is a request with the default settings.

        Raises:
            GenerationError: A request's settings are invalid or its prompt plus
                budget exceed the model's positions (nothing is generated then).
        """
        reqs = [r if isinstance(r, GenerationRequest) else GenerationRequest(r) for r in requests]
        prompts = [encode_prompt(self.tokenizer, r.prompt) for r in reqs]
        for request, prompt in zip(reqs, prompts, strict=True):
            check_request(request, prompt, self.max_positions)
        results: list[GenerationResult] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for group in self._batches(reqs):
                    results += self._generate_batch(
                        [reqs[i] for i in group], [prompts[i] for i in group]
                    )
        finally:  # a failed generation must not leave a training model in eval mode
            self.model.train(was_training)
        return results

    def _batches(self, requests: Sequence[GenerationRequest]) -> Iterator[list[int]]:
        """Consecutive groups of request indices with at most ``max_batch_rows`` rows each."""
        limit = self.options.max_batch_rows
        group: list[int] = []
        rows = 0
        for i, request in enumerate(requests):
            if group and limit is not None and rows + request.n > limit:
                yield group
                group, rows = [], 0
            group.append(i)
            rows += request.n
        if group:
            yield group

    def _generate_batch(
        self, requests: Sequence[GenerationRequest], prompts: Sequence[list[int]]
    ) -> list[GenerationResult]:
        """Prefill the prompts, expand them to ``n`` rows each, decode until every row finished."""
        owner = torch.repeat_interleave(
            torch.arange(len(requests)), torch.tensor([r.n for r in requests])
        )
        decoder, logits = self._prefill(requests, prompts, owner)
        states, sampler = self._rows(requests, owner)
        live = torch.arange(len(states))  # batch row -> index into states
        while True:
            tokens, logprobs = sampler.choose(logits)
            finished_now = self._record(states, live, tokens, logprobs)
            if all(states[i].finished for i in live.tolist()):
                break
            if finished_now and self.options.compacts:
                keep = torch.tensor(
                    [r for r, i in enumerate(live.tolist()) if not states[i].finished]
                )
                decoder.keep(keep)
                sampler.keep(keep)
                live, tokens = live[keep], tokens[keep]
            logits = decoder.step(tokens)
        return self._results(requests, prompts, states, owner)

    def _prefill(
        self,
        requests: Sequence[GenerationRequest],
        prompts: Sequence[list[int]],
        owner: torch.Tensor,
    ) -> tuple[BatchDecoder, torch.Tensor]:
        """The decoder of this batch and the first logits of every row (``owner`` order).

        Each prompt is prefilled once and its cache rows copied to its ``n``
        rows; a static cache cannot copy rows, so there the rows are expanded
        before the prefill.
        """
        shared = self.options.kv_cache != "static"
        padded = PaddedPrompts.of(
            prompts if shared else [prompts[i] for i in owner.tolist()], self.pad_id
        )
        capacity = padded.ids.shape[1] + max(r.max_new_tokens for r in requests)
        if not shared:  # rounded up, so that batches of other lengths reuse the compiled step
            capacity = static_capacity(capacity)
        adapters = _row_adapters(
            requests if shared else [requests[i] for i in owner.tolist()], self.model
        )
        decoder = BatchDecoder(self.runner, padded, capacity, adapters)
        logits = decoder.prefill(padded)
        if shared and len(owner) > len(requests):
            decoder.keep(owner)
            logits = logits[owner]
        return decoder, logits

    def _rows(
        self, requests: Sequence[GenerationRequest], owner: torch.Tensor
    ) -> tuple[list[CompletionState], Sampler]:
        """One completion state per row, and the sampler with every row's settings."""
        generators = [r.random_generator() if r.temperature > 0 else None for r in requests]
        rows = [requests[i] for i in owner.tolist()]
        seen = [0] * len(requests)  # the row's index among its request's n rows
        states = []
        for request, index in zip(rows, owner.tolist(), strict=True):
            states.append(CompletionState(request, self.eos_ids, self.tokenizer, seen[index]))
            seen[index] += 1
        sampler = Sampler(
            [r.temperature for r in rows],
            [r.top_k for r in rows],
            [r.top_p for r in rows],
            [generators[i] for i in owner.tolist()],
            logprobs=any(r.logprobs for r in rows),
        )
        return states, sampler

    @staticmethod
    def _record(
        states: Sequence[CompletionState],
        live: torch.Tensor,
        tokens: torch.Tensor,
        logprobs: torch.Tensor | None,
    ) -> bool:
        """Give each live row its token; True when a row finished with it."""
        values = logprobs.tolist() if logprobs is not None else [None] * len(live)
        finished_now = False
        for index, token, logprob in zip(live.tolist(), tokens.tolist(), values, strict=True):
            state = states[index]
            if not state.finished:  # rows of a static batch go on decoding after they finish
                finished_now |= state.add(token, logprob)
        return finished_now

    @staticmethod
    def _results(
        requests: Sequence[GenerationRequest],
        prompts: Sequence[list[int]],
        states: Sequence[CompletionState],
        owner: torch.Tensor,
    ) -> list[GenerationResult]:
        """Each request's completions, in the order of its rows."""
        completions: list[list[Completion]] = [[] for _ in requests]
        for state, index in zip(states, owner.tolist(), strict=True):
            completions[index].append(state.result())
        return [GenerationResult(list(p), c) for p, c in zip(prompts, completions, strict=True)]


def _row_adapters(requests: Sequence[GenerationRequest], model: Any) -> list[str] | None:
    """Each request's adapter for peft's ``adapter_names``; None when no request names one.

    A request without an adapter runs on the model as it is, also in a batch
    with others: on its active adapter (peft's ``__base__`` names the bare base).
    """
    if all(r.adapter is None for r in requests):
        return None
    active = getattr(model, "active_adapter", None)
    default = active if isinstance(active, str) else "__base__"
    return [r.adapter if r.adapter is not None else default for r in requests]


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids: the model's generation config (id or list), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)
