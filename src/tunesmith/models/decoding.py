"""The model side of batched generation: prefill and decoding steps over one batch.

``ModelRunner`` calls the model (eagerly, or a compiled decoding step) and
keeps the timings; ``BatchDecoder`` holds what changes shape with a batch
(KV cache, attention mask, next positions) so that dropping finished rows is
one call. The request side (sampling, stop conditions, results) is in
``generator.py``.

Prompts are left-padded so that every row's next token is in the last
column. Position ids count real tokens only, padding at 0, exactly as
``model.generate`` builds them: with the same inputs, the same model calls
give the same logits, which is what makes greedy output identical.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.errors import GenerationError
from tunesmith.models.kv_cache import CacheKind, new_cache

#: The static cache's length is a multiple of this (one compiled step serves many prompt lengths).
STATIC_CAPACITY_STEP = 64


@dataclass(frozen=True)
class GeneratorOptions:
    """How the generator decodes; each switch is measured in docs/benchmarks.md.

    Attributes:
        kv_cache: ``preallocated`` (default: written in place), ``dynamic``
            (transformers' growing cache) or ``static`` (fixed shape; needed by ``compile``).
        compile: ``torch.compile`` the decoding step (static cache only); compiled
            once per batch shape, the time kept apart in ``GenerationStats.compile_seconds``.
        compaction: Drop finished rows from the batch (not with the static cache).
        last_logits_only: Run the LM head on the last prompt position only.
        prefill_chunk: Prefill in chunks of this many positions (None: one pass).
        max_batch_rows: Decode at most this many rows (completions) at once; more
            requests are served in consecutive batches (None: all at once). The
            ``n`` rows of one request always share a batch.
    """

    kv_cache: CacheKind = "preallocated"
    compile: bool = False
    compaction: bool = True
    last_logits_only: bool = True
    prefill_chunk: int | None = None
    max_batch_rows: int | None = None

    def problems(self) -> list[str]:
        """Combinations that cannot work, one phrase each."""
        checks = [
            (
                self.kv_cache in ("preallocated", "dynamic", "static"),
                f"unknown kv_cache {self.kv_cache!r}",
            ),
            (not self.compile or self.kv_cache == "static", "compile needs kv_cache='static'"),
            (
                self.prefill_chunk is None or self.prefill_chunk >= 1,
                "prefill_chunk must be at least 1",
            ),
            (
                self.max_batch_rows is None or self.max_batch_rows >= 1,
                "max_batch_rows must be at least 1",
            ),
        ]
        return [message for ok, message in checks if not ok]

    @property
    def compacts(self) -> bool:
        """Finished rows leave the batch (a static cache keeps its shape)."""
        return self.compaction and self.kv_cache != "static"


@dataclass
class GenerationStats:
    """Where a generator's time went, summed over its calls.

    ``row_steps`` counts one per row per decoding step: the work compaction saves.
    """

    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0
    decode_steps: int = 0
    row_steps: int = 0


@dataclass
class PaddedPrompts:
    """Left-padded prompts: ids and attention mask, and each prompt's real length."""

    ids: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def of(cls, prompts: Sequence[Sequence[int]], pad_id: int) -> PaddedPrompts:
        """Pad ``prompts`` on the left to the longest."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        return cls(ids, mask, torch.tensor([len(p) for p in prompts]))

    @property
    def positions(self) -> torch.Tensor:
        """Position ids counting real tokens only (padding at 0), as ``model.generate`` does."""
        return (self.mask.cumsum(-1) - 1).clamp(min=0)


class ModelRunner:
    """Calls the model for the generator: eager forward passes and the compiled decoding step.

    Args:
        model: A decoder-only transformers model in eval mode.
        options: The generator's options.
    """

    def __init__(self, model: Any, options: GeneratorOptions) -> None:
        self.model = model
        self.options = options
        self.stats = GenerationStats()
        self._keeps_logits = accepts_logits_to_keep(model)
        self._compiled: Any = None
        self._compiled_shapes: set[tuple[int, ...]] = set()
        self._static_caches: dict[tuple[int, int], Any] = {}

    def cache_for(self, rows: int, capacity: int) -> Any:
        """An empty KV cache for ``rows`` rows of ``capacity`` positions.

        A static cache is kept and reset for the next batch of the same shape:
        the compiled step is specialised to its buffers.
        """
        if self.options.kv_cache != "static":
            return new_cache(self.model, self.options.kv_cache, capacity)
        key = (rows, capacity)
        if key in self._static_caches:
            self._static_caches[key].reset()
        else:
            self._static_caches[key] = new_cache(self.model, "static", capacity)
        return self._static_caches[key]

    def forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        adapters: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Float32 logits of the last position of ``ids`` (eager model call).

        ``adapters`` names each row's peft adapter (a mixed-adapter batch).
        """
        kwargs: dict[str, Any] = {}
        if adapters is not None:
            kwargs["adapter_names"] = list(adapters)
        if self._keeps_logits:
            kwargs["logits_to_keep"] = 1 if self.options.last_logits_only else 0
        return _last_logits(self.model, ids, mask, positions, cache, **kwargs)

    def compiled_step(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """One decoding step of the compiled model; the first call per shape counts as compiling.

        The 4-D attention mask is built outside the compiled region, as
        ``model.generate`` does with a static cache, so the graph has no
        data-dependent branches and is compiled once per batch shape.
        """
        from transformers.masking_utils import create_causal_mask

        if self._compiled is None:
            self._compiled = torch.compile(self.model.forward, dynamic=False)
        mask4d = create_causal_mask(
            config=self.model.config,
            inputs_embeds=torch.empty((*ids.shape, 0), dtype=self.model.dtype),
            attention_mask=mask,
            past_key_values=cache,
            position_ids=positions,
        )
        started = time.perf_counter()
        logits = _last_logits(self._compiled, ids, mask4d, positions, cache, logits_to_keep=1)
        if tuple(ids.shape) not in self._compiled_shapes:
            self._compiled_shapes.add(tuple(ids.shape))
            self.stats.compile_seconds += time.perf_counter() - started
            self.stats.decode_seconds -= time.perf_counter() - started  # counted apart
        return logits


def _last_logits(
    call: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: Any,
    **kwargs: Any,
) -> torch.Tensor:
    """Float32 logits of the last position from one cached model call (eager or compiled)."""
    out = call(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        **kwargs,
    )
    return out.logits[:, -1].float()


class BatchDecoder:
    """One batch being decoded: its cache, attention mask and next positions.

    Args:
        runner: Calls the model.
        prompts: The batch's prompts, left-padded.
        capacity: Positions per row: the padded prompt plus the largest token budget.
        adapters: Each row's peft adapter name, or None (the model as it is).
    """

    def __init__(
        self,
        runner: ModelRunner,
        prompts: PaddedPrompts,
        capacity: int,
        adapters: Sequence[str] | None = None,
    ) -> None:
        self.runner = runner
        self.adapters = list(adapters) if adapters is not None else None
        if self.adapters is not None and runner.options.compile:
            raise GenerationError("a mixed-adapter batch cannot use the compiled decoding step")
        self.static = runner.options.kv_cache == "static"
        self.cache = runner.cache_for(prompts.ids.shape[0], capacity)
        self.mask = torch.ones((prompts.ids.shape[0], capacity), dtype=torch.long)
        self.mask[:, : prompts.ids.shape[1]] = prompts.mask
        self.filled = 0  # cache columns holding a position
        self.next_positions = prompts.lengths.clone()

    def _mask(self, upto: int) -> torch.Tensor:
        # A static cache attends over its whole length (the future columns are
        # masked causally); the other caches hold the filled columns only.
        return self.mask if self.static else self.mask[:, :upto]

    def prefill(self, prompts: PaddedPrompts) -> torch.Tensor:
        """Last-position logits of every prompt; the cache then holds the prompts."""
        started = time.perf_counter()
        width = prompts.ids.shape[1]
        chunk = self.runner.options.prefill_chunk or width
        positions = prompts.positions
        for start in range(0, width, chunk):
            end = min(start + chunk, width)
            logits = self.runner.forward(
                prompts.ids[:, start:end],
                self._mask(end),
                positions[:, start:end],
                self.cache,
                self.adapters,
            )
        self.filled = width
        self.runner.stats.prefill_seconds += time.perf_counter() - started
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of the position after ``tokens`` (one token per row)."""
        started = time.perf_counter()
        self.filled += 1
        positions = self.next_positions[:, None]
        self.next_positions = self.next_positions + 1
        if self.runner.options.compile:
            logits = self.runner.compiled_step(tokens[:, None], self.mask, positions, self.cache)
        else:
            logits = self.runner.forward(
                tokens[:, None], self._mask(self.filled), positions, self.cache, self.adapters
            )
        stats = self.runner.stats
        stats.decode_seconds += time.perf_counter() - started
        stats.decode_steps += 1
        stats.row_steps += len(tokens)
        return logits

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (in this order; repeats allowed): cache, mask and positions."""
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]
        self.next_positions = self.next_positions[rows]
        if self.adapters is not None:
            self.adapters = [self.adapters[r] for r in rows.tolist()]


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether ``model`` can run its LM head on the last positions only (``logits_to_keep``).

    A wrapper such as a peft model takes ``**kwargs`` and hands them to the
    model it wraps, so the wrapped model's signature decides.
    """
    parameters = inspect.signature(model.forward).parameters
    if "logits_to_keep" in parameters:
        return True
    passes_on = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    base = model.get_base_model() if hasattr(model, "get_base_model") else None
    return passes_on and base is not None and base is not model and accepts_logits_to_keep(base)


def static_capacity(capacity: int) -> int:
    """``capacity`` rounded up to a multiple of ``STATIC_CAPACITY_STEP``."""
    return -(-capacity // STATIC_CAPACITY_STEP) * STATIC_CAPACITY_STEP
