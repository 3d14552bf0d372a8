"""Key/value caches for the batched generator.

transformers' ``DynamicCache`` grows by ``torch.cat``: every decoding step
copies every layer's whole cache to append one position. A generator knows
the longest sequence it will build (padded prompt plus the token budget), so
``PreallocatedLayer`` allocates that once and writes each step's keys and
values in place, handing the model a view of the filled part: the same
values in the same layout, with no copy per step. Its ``batch_select_indices``
keeps the rows still decoding, so finished requests stop costing compute.

The static cache (transformers' ``StaticCache``) has one fixed shape from the
first step to the last, which is what ``torch.compile`` needs to compile the
decoding step once; it cannot drop finished rows.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache

CacheKind = Literal["preallocated", "dynamic", "static"]


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer with room for ``capacity`` positions, filled in place.

    It is a ``DynamicLayer`` to the model (same mask sizes: the filled length),
    only its storage differs.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate both buffers at the first update, when shapes, dtype and device are known."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self._keys = key_states.new_empty(
            (*key_states.shape[:2], self.capacity, key_states.shape[3])
        )
        self._values = value_states.new_empty(
            (*value_states.shape[:2], self.capacity, value_states.shape[3])
        )
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions after the filled ones; return views of everything filled."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(
                f"KV cache full: {end} positions asked for, room for {self.capacity}"
            )
        self._keys[:, :, self.length : end].copy_(key_states)
        self._values[:, :, self.length : end].copy_(value_states)
        self.length = end
        self.keys = self._keys[:, :, :end]
        self.values = self._values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Positions filled so far."""
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (in this order; repeats allowed), copying the filled part."""
        if not self.is_initialized:
            return
        self._keys = self._select(self._keys, indices)
        self._values = self._select(self._values, indices)
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def _select(self, buffer: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        out = buffer.new_empty((len(indices), *buffer.shape[1:]))
        out[:, :, : self.length] = buffer[indices, :, : self.length]
        return out

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times in place (beam search and ``n`` completions)."""
        rows = self._keys.shape[0] if self.is_initialized else 0
        self.batch_select_indices(torch.arange(rows).repeat_interleave(repeats))

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Reorder the rows (beam search)."""
        self.batch_select_indices(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (transformers' negative convention)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of positions to remove")
        self.length = max(0, self.length + tokens_to_remove)
        if self.is_initialized:
            self.keys = self._keys[:, :, : self.length]
            self.values = self._values[:, :, : self.length]

    def reset(self) -> None:
        """Empty the layer (the buffers are allocated again at the next update)."""
        self.length = 0
        super().reset()


def new_cache(model: Any, kind: CacheKind, capacity: int) -> Cache:
    """An empty cache of ``kind`` for ``model``, with room for ``capacity`` positions per row.

    ``preallocated`` replaces only the plain full-attention layers; sliding-window
    and other special layers keep transformers' implementation.
    """
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=capacity)
    cache = DynamicCache(config=model.config)
    if kind == "preallocated":
        cache.layers = [
            PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer
            for layer in cache.layers
        ]
    return cache
