"""What autograd keeps for the backward pass, and which part of the model kept it.

Why: a training step's peak is weights + gradients + optimizer state +
*saved activations* + temporaries, and only the last two grow with batch and
sequence length. Peak RSS says how much; this says where: every tensor
autograd saves goes through ``torch.autograd.graph.saved_tensors_hooks``, and
forward hooks on every module say which module was running when it was saved.
Storages are counted once (views of one tensor share it), parameters not at
all (they are weights, counted elsewhere).

    with SavedActivations(model) as saved:
        loss = loss_fn(model(**inputs))
    saved.by_group  # {"block 0": bytes, ..., "lm head": bytes, "outside the model": bytes}

``tunesmith estimate`` counts activations with it; ``benchmarks/sft_memory.py``
breaks an SFT step down with it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch

_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
OUTSIDE = "outside the model"


def storages(tensor: torch.Tensor) -> list[tuple[int, int]]:
    """``(data pointer, bytes)`` of the storages behind a tensor.

    A tensor subclass (a QLoRA NF4/int8 weight) has none of its own: its inner tensors do.
    """
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None:
        inner = [getattr(tensor, name) for name in flatten()[0]]
        return [s for t in inner if isinstance(t, torch.Tensor) for s in storages(t)]
    if tensor.layout is not torch.strided or tensor.device.type == "meta":
        return []
    storage = tensor.untyped_storage()
    return [(storage.data_ptr(), storage.nbytes())]


def default_group(name: str) -> str:
    """``block N`` for a module inside the N-th transformer block; else its top-level role."""
    match = _BLOCK.search(name)
    if match:
        return f"block {match.group(1)}"
    leaf = name.rsplit(".", 1)[-1]
    if leaf in {"lm_head", "embed_out", "output"}:
        return "lm head"
    if "embed" in leaf or leaf in {"wte", "wpe"}:
        return "embeddings"
    return leaf or "model"


class SavedActivations:
    """Context manager: bytes of tensors saved for backward, grouped by the module saving them.

    Args:
        model: The module whose submodules are attributed.
        group: Maps a module's qualified name to its group (default: blocks, embeddings,
            LM head, other top-level modules by name).
    """

    def __init__(self, model: torch.nn.Module, group: Callable[[str], str] = default_group) -> None:
        self.model = model
        self.group = group
        self.by_group: dict[str, int] = defaultdict(int)
        #: (bytes, group, shape, dtype) of the largest saved tensors, largest first.
        self.biggest: list[tuple[int, str, tuple[int, ...], str]] = []
        self._stack: list[str] = []
        self._seen: set[int] = set()
        self._params: set[int] = set()
        self._handles: list[Any] = []
        self._hooks: Any = None

    @property
    def total(self) -> int:
        """All saved bytes."""
        return sum(self.by_group.values())

    @property
    def largest(self) -> int:
        """Bytes of the largest saved storage (the backward's transient buffers are of its size)."""
        return self.biggest[0][0] if self.biggest else 0

    def __enter__(self) -> SavedActivations:
        self._params = {ptr for p in self.model.parameters() for ptr, _ in storages(p)}
        for name, module in self.model.named_modules():
            if not name:
                continue
            label = self.group(name)
            self._handles.append(module.register_forward_pre_hook(self._enter(label)))
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._hooks.__exit__(exc_type, exc, tb)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.biggest.sort(reverse=True)
        del self.biggest[10:]

    def _enter(self, label: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            self._stack.append(label)

        return hook

    def _leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._stack:
            self._stack.pop()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        label = self._stack[-1] if self._stack else OUTSIDE
        for ptr, nbytes in storages(tensor):
            if ptr in self._params or ptr in self._seen or ptr == 0:
                continue
            self._seen.add(ptr)
            self.by_group[label] += nbytes
            self.biggest.append((nbytes, label, tuple(tensor.shape), str(tensor.dtype)))
        return tensor
