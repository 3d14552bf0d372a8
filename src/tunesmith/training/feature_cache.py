"""Frozen-prefix feature cache: run frozen bottom blocks once, train the top from their output.

Why: "train only the top 2-3 layers" still pays a forward pass through every
frozen block on every step of every epoch, although those blocks always map
an example to the same hidden states. When the embeddings and the bottom K
blocks are frozen and nothing adapts them, their output is computed once per
example before training and the loop then runs only the top blocks and the
head, feeding them the cached states.

What changes, and is documented: the cached blocks run in **eval mode**
(no dropout in them), as they would at inference. Everything above them
trains exactly as before; their gradients equal those of a model whose
bottom blocks run in eval mode (tested).

How, without knowing the architecture: the cache finds the embeddings module
(the common module of the ``embeddings`` parameter group) and the block list
(``discover_layers``). For a training step it swaps the embeddings module for
one that returns the batch's cached states and cuts the block list to its top
blocks, then restores both. Before training, one batch is run both ways in
eval mode; if the outputs differ (an architecture that adds position
information outside its embeddings module, like GPT-2), the cache is not used.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from tunesmith.data.batching import FeatureDataset, length_sorted_order
from tunesmith.errors import ConfigError
from tunesmith.models.layers import EMBEDDINGS, LayerMap, discover_layers

log = logging.getLogger(__name__)

InputsFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]

#: Largest share of the available memory an in-memory cache may take under ``auto``.
_MEMORY_SHARE = 0.25
#: Outputs of the cached and the plain forward must agree this closely (fp32).
_VERIFY_ATOL = 1e-4


class _CachedStates(nn.Module):
    """Stands in for the embeddings module: returns the current batch's cached states."""

    def __init__(self) -> None:
        super().__init__()
        self.states: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        assert self.states is not None, "cached states were not set for this batch"
        return self.states


def _module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_module(root, parent), name, module)


def _common_module(names: Sequence[str]) -> str:
    """The deepest module path shared by every parameter name."""
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def frozen_prefix(model: nn.Module, layers: LayerMap | None = None) -> tuple[str, str, int] | str:
    """Where the frozen prefix of ``model`` ends, or why there is none.

    Returns:
        ``(embeddings module path, block list path, K)`` with the embeddings
        and the bottom ``K >= 1`` blocks holding no trainable parameter, or a
        string saying why the model has no cacheable prefix.
    """
    if layers is None:
        try:
            layers = discover_layers(model)
        except ConfigError as exc:
            return str(exc)
    if len(layers.stacks) != 1:
        return "the model has several block stacks (encoder-decoder)"
    params = dict(model.named_parameters())
    embeddings = [n for n, g in layers.group_of.items() if g == EMBEDDINGS]
    if not embeddings:
        return "no embedding parameters found below the blocks"
    if any(params[n].requires_grad for n in embeddings):
        return "the embeddings train"
    frozen = 0
    for group in layers.blocks[0]:
        if any(p.requires_grad for _, p in layers.params_of(model, group)):
            break
        frozen += 1
    if frozen == 0:
        return "the bottom block trains"
    if frozen == len(layers.blocks[0]):
        frozen -= 1  # keep one block to run, so the top of the model stays as it was
        if frozen == 0:
            return "the model has a single block"
    stack = layers.stacks[0]
    emb_path = _common_module(embeddings)
    if not emb_path or stack.startswith(emb_path + "."):
        return "the embeddings are not a module of their own (position added outside them)"
    return emb_path, stack, frozen


class FeatureCache:
    """The cached output of a model's frozen bottom blocks, one entry per training example.

    Build it with :meth:`build`; :meth:`replaying` runs a batch through the top only.

    Args:
        embeddings: Module path of the embeddings module.
        stack: Module path of the block list.
        frozen: Number of bottom blocks whose output is cached.
        offsets: Start of each example's states in the flat store (plus the end).
        store: ``[total real tokens, hidden]`` states, or None when on disk.
        path: The safetensors file holding them when on disk.
        model_inputs: Picks the model's inputs from a batch (the task's ``model_inputs``).
    """

    def __init__(
        self,
        embeddings: str,
        stack: str,
        frozen: int,
        offsets: list[int],
        store: torch.Tensor | None,
        path: Path | None = None,
        model_inputs: InputsFn | None = None,
    ) -> None:
        self.embeddings, self.stack, self.frozen = embeddings, stack, frozen
        self.model_inputs = model_inputs or default_inputs
        self.offsets = offsets
        self.store = store
        self.path = path
        self._file = safe_open(str(path), "pt") if path is not None else None
        self._slice = self._file.get_slice("states") if self._file is not None else None
        self._stand_in = _CachedStates()

    @property
    def nbytes(self) -> int:
        """Size of the cached states."""
        if self.store is not None:
            return self.store.numel() * self.store.element_size()
        return self.path.stat().st_size if self.path is not None else 0

    # -- building ---------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: nn.Module,
        dataset: Any,
        collator: Any,
        *,
        batch_size: int,
        where: str = "memory",
        folder: Path | None = None,
        prefix: tuple[str, str, int] | None = None,
        device: torch.device | str = "cpu",
        model_inputs: InputsFn | None = None,
        progress: bool = False,
    ) -> FeatureCache:
        """Run every example of ``dataset`` through the frozen prefix once (eval mode).

        Args:
            model: The adapted model (frozen prefix already frozen).
            dataset: A ``FeatureDataset`` (items carry their ``index``).
            collator: Pads a list of items into a batch.
            batch_size: Examples per forward pass (no gradients: large is fine).
            where: ``memory`` or ``disk`` (a safetensors file in ``folder``).
            folder: Where the disk cache goes.
            prefix: ``frozen_prefix(model)`` when already known.
            device: Where the model is; the cache itself stays on the CPU.
            model_inputs: Picks the model's inputs from a batch (default: all but
                ``labels`` and ``index``).
        """
        model_inputs = model_inputs or default_inputs
        found = prefix or frozen_prefix(model)
        if isinstance(found, str):
            raise ValueError(f"no frozen prefix to cache: {found}")
        emb_path, stack_path, frozen = found
        lengths = [int(sum(item["attention_mask"])) for item in _items(dataset)]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        store: torch.Tensor | None = None
        blocks = _module(model, stack_path)
        captured: list[torch.Tensor] = []

        def grab(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)

        was_training = model.training
        handle = blocks[frozen - 1].register_forward_hook(grab)
        # Longest first: the least padding, and the largest batch fails first if any does.
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=length_sorted_order(lengths),
            collate_fn=collator,
        )
        model.eval()
        try:
            with torch.inference_mode(), _cut_blocks(model, stack_path, 0, frozen):
                for batch in _progress(loader, progress, len(loader)):
                    captured.clear()
                    model(**_to(model_inputs(batch), device))
                    states = captured[0][batch["attention_mask"].to(device).bool()].cpu()
                    if store is None:
                        store = torch.empty(offsets[-1], states.shape[-1], dtype=states.dtype)
                    first = 0
                    for i, n in zip(batch["index"].tolist(), _counts(batch), strict=True):
                        store[offsets[i] : offsets[i] + n] = states[first : first + n]
                        first += n
        finally:
            handle.remove()
            model.train(was_training)
        assert store is not None
        path = None
        if where == "disk":
            assert folder is not None, "a disk cache needs a folder"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "prefix-states.safetensors"
            save_file({"states": store}, str(path))
            store = None
        return cls(emb_path, stack_path, frozen, offsets, store, path, model_inputs)

    # -- training ----------------------------------------------------------------
    def states_for(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's cached states laid out like its ``input_ids`` (pads are zero)."""
        mask = batch["attention_mask"]
        rows = [self._states(i) for i in batch["index"].tolist()]
        out = torch.zeros(*mask.shape, rows[0].shape[-1], dtype=rows[0].dtype)
        out[mask.cpu().bool()] = torch.cat(rows)
        return out.to(mask.device)

    def _states(self, i: int) -> torch.Tensor:
        start, end = self.offsets[i], self.offsets[i + 1]
        if self.store is not None:
            return self.store[start:end]
        assert self._slice is not None
        return self._slice[start:end]

    def close(self) -> None:
        """Drop the states (and delete the disk file): the cache is rebuilt when needed."""
        self.store, self._slice, self._file = None, None, None
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    @contextmanager
    def replaying(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Iterator[None]:
        """Within this block ``model(**inputs)`` runs only the top blocks and the head."""
        self._stand_in.states = self.states_for(batch)
        original = _module(model, self.embeddings)
        _set_module(model, self.embeddings, self._stand_in)
        try:
            with _cut_blocks(model, self.stack, self.frozen, None):
                yield
        finally:
            _set_module(model, self.embeddings, original)
            self._stand_in.states = None

    def verify(self, model: nn.Module, batch: dict[str, torch.Tensor], device: Any) -> float:
        """Largest difference between the plain and the cached forward on ``batch`` (eval)."""
        batch = {k: v.to(device) for k, v in batch.items()}
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                plain = _first_tensor(model(**self.model_inputs(batch)))
                with self.replaying(model, batch):
                    cached = _first_tensor(model(**self.model_inputs(batch)))
        finally:
            model.train(was_training)
        return float((plain.float() - cached.float()).abs().max())


def plan_cache(
    mode: str,
    model: nn.Module,
    dataset: Any,
    collator: Any,
    *,
    cacheable: bool,
    batch_size: int,
    folder: Path | None,
    device: Any = "cpu",
    model_inputs: InputsFn | None = None,
    progress: bool = False,
) -> FeatureCache | None:
    """Build the cache ``train.feature_cache`` asks for, or explain why there is none.

    ``auto`` uses the cache whenever the model has a frozen prefix, in memory
    when it fits in a quarter of the available memory, else on disk; ``memory``
    and ``disk`` insist (an error when impossible); ``off`` never caches.
    """
    if mode == "off" or not len(dataset):
        return None
    reason = None if cacheable else "the method changes what the frozen blocks see"
    found = frozen_prefix(model) if reason is None else reason
    if isinstance(found, str):
        if mode != "auto":
            raise ConfigError(f"train.feature_cache={mode} is impossible here: {found}")
        log.debug("feature cache not used: %s", found)
        return None
    # A few examples first: an architecture the swap does not fit fails in a second.
    probe_set = FeatureDataset([dataset.features[i] for i in range(min(4, len(dataset)))])
    probe = FeatureCache.build(
        model,
        probe_set,
        collator,
        batch_size=4,
        prefix=found,
        device=device,
        model_inputs=model_inputs,
    )
    diff = probe.verify(model, collator([probe_set[i] for i in range(len(probe_set))]), device)
    if not math.isfinite(diff) or diff > _VERIFY_ATOL:
        message = (
            f"the cached forward differs from the plain one by {diff:.2g} on this "
            "architecture; set train.feature_cache=off"
        )
        if mode != "auto":
            raise ConfigError(f"train.feature_cache={mode}: {message}")
        log.warning("feature cache not used: %s", message)
        return None
    where = mode
    if mode == "auto":
        hidden = _hidden_size(model)
        tokens = sum(int(sum(item["attention_mask"])) for item in _items(dataset))
        need = tokens * hidden * 4
        where = "memory" if need < _MEMORY_SHARE * psutil.virtual_memory().available else "disk"
    cache = FeatureCache.build(
        model,
        dataset,
        collator,
        batch_size=batch_size,
        where=where,
        folder=folder,
        prefix=found,
        device=device,
        model_inputs=model_inputs,
        progress=progress,
    )
    log.info(
        "feature cache: the bottom %d of %d blocks are frozen; their output for %d examples "
        "was computed once in eval mode (%.0f MB in %s; max difference %.1e) and the top "
        "trains from it (train.feature_cache=off runs them every step, with dropout)",
        cache.frozen,
        len(_module(model, cache.stack)),
        len(dataset),
        cache.nbytes / 2**20,
        where,
        diff,
    )
    return cache


@contextmanager
def _cut_blocks(model: nn.Module, path: str, start: int, end: int | None) -> Iterator[None]:
    """Temporarily keep only ``blocks[start:end]`` in the block list at ``path``."""
    full = _module(model, path)
    _set_module(model, path, nn.ModuleList(list(full)[start:end]))
    try:
        yield
    finally:
        _set_module(model, path, full)


def _items(dataset: Any) -> Iterator[dict[str, Any]]:
    features = getattr(dataset, "features", None)
    return iter(features) if features is not None else (dataset[i] for i in range(len(dataset)))


def default_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything in a batch but the labels and the example indices."""
    return {k: v for k, v in batch.items() if k not in ("labels", "index")}


def _to(batch: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _counts(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["attention_mask"].sum(-1).tolist()


def _first_tensor(outputs: Any) -> torch.Tensor:
    return outputs[0] if not isinstance(outputs, torch.Tensor) else outputs


def _hidden_size(model: nn.Module) -> int:
    """Width of the hidden states (for the size estimate before building)."""
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if isinstance(size, int):
        return size
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__}")


def _progress(loader: DataLoader, enabled: bool, total: int) -> Any:
    if not enabled:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, total=total, desc="feature cache", unit="batch")
