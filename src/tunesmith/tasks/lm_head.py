"""Run a causal LM up to its output head, so the loss can apply the head itself.

Why: the model's own forward projects every position onto the vocabulary;
the loss needs only the labelled positions (``tasks.losses.linear_ce`` applies
the head to those, in chunks). For the length of one forward the head returns
its input, so the model's ``logits`` are the final hidden states; everything
before the head (peft adapters, prompt tokens, position ids of packed rows)
runs exactly as usual.

Only where that is exact: a plain ``nn.Linear`` head (not wrapped by an
adapter) and no logit transform after it (scaling or soft-capping, which some
architectures apply to the head's output).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.tasks.losses import IGNORE

#: Config attributes of architectures that transform the logits after the head.
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


@dataclass
class HiddenOutputs:
    """What the forward gives when the head is deferred: final states and the head."""

    hidden: torch.Tensor
    head: torch.nn.Linear


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / ``torch.compile`` wrappers."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def output_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's LM head when deferring it is exact, else None (see the module docstring)."""
    inner = plain_model(model)
    getter = getattr(inner, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if type(head) is not torch.nn.Linear:
        return None
    config = getattr(inner, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    return head


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


@contextmanager
def head_deferred(head: torch.nn.Linear) -> Iterator[None]:
    """Within the block, ``head(x)`` returns ``x`` (the instance's ``forward`` is shadowed)."""
    head.forward = _identity  # type: ignore[method-assign]
    try:
        yield
    finally:
        del head.forward


def forward_to_head(model: torch.nn.Module, inputs: dict[str, Any]) -> HiddenOutputs | None:
    """The model's final hidden states for ``inputs``, or None where the head cannot be deferred."""
    head = output_head(model)
    if head is None:
        return None
    with head_deferred(head):
        outputs = model(**inputs)
    return HiddenOutputs(outputs.logits, head)


def labelled_states(
    hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The states of the positions whose next token is labelled, and those tokens.

    Position t predicts label t + 1; extra leading positions (prompt tuning's
    virtual tokens) are dropped as in ``text_logits``.
    """
    extra = hidden.shape[1] - labels.shape[1]
    hidden = hidden[:, extra:] if extra > 0 else hidden
    mask = labels[:, 1:] != IGNORE
    return hidden[:, :-1][mask], labels[:, 1:][mask]


def text_logits(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """The logits of the batch's own positions.

    Prompt tuning puts its virtual tokens in front of the input, so the model
    returns that many extra positions first; they predict nothing of the text.
    """
    logits = outputs.logits
    extra = logits.shape[1] - labels.shape[1]
    return logits[:, extra:] if extra > 0 else logits
