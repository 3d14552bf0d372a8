"""Dropout overrides, applied when the model is loaded.

Dropout probabilities are read from the model's config when its modules are
built (some attention implementations keep the number, not a module), so
changing ``model.config`` afterwards does nothing; the new values go to
``from_pretrained`` as config overrides instead. Every architecture names its
dropout keys differently; the keys found in the model's ``config.json`` are set.
"""

from __future__ import annotations

from typing import Any

import torch

from tunesmith.errors import ConfigError
from tunesmith.models.loading import read_model_config

#: ``config.json`` keys of the hidden-state (residual / embedding / feed-forward) dropout.
HIDDEN_KEYS = (
    "hidden_dropout_prob",  # BERT, RoBERTa, ELECTRA, MiniLM
    "hidden_dropout",  # Falcon, BLOOM
    "dropout",  # DistilBERT, BART, Whisper
    "dropout_rate",  # T5 (one key for everything)
    "resid_pdrop",  # GPT-2, GPT-J
    "embd_pdrop",  # GPT-2
)
#: ``config.json`` keys of the attention-probability dropout.
ATTENTION_KEYS = (
    "attention_probs_dropout_prob",  # BERT family
    "attention_dropout",  # Llama, Mistral, Qwen, DistilBERT, BART
    "attn_pdrop",  # GPT-2
)


def dropout_changes(
    model_config: dict[str, Any] | None, hidden: float | None, attention: float | None
) -> dict[str, float]:
    """Config overrides that set the requested dropouts (``{}`` when none is requested).

    Args:
        model_config: The model's ``config.json`` (None: not a local folder).
        hidden: ``regularize.hidden_dropout``.
        attention: ``regularize.attention_dropout``.

    Raises:
        ConfigError: The model has no key for a requested dropout (naming the
            keys it has, e.g. T5's single ``dropout_rate``).
    """
    wanted = {
        "hidden_dropout": (hidden, HIDDEN_KEYS),
        "attention_dropout": (attention, ATTENTION_KEYS),
    }
    changes: dict[str, float] = {}
    for setting, (value, keys) in wanted.items():
        if value is None:
            continue
        if model_config is None:
            raise ConfigError(
                f"regularize.{setting}: needs a local model folder (its config.json names the "
                "dropout keys)"
            )
        found = [k for k in keys if isinstance(model_config.get(k), int | float)]
        if not found:
            present = [k for k in (*HIDDEN_KEYS, *ATTENTION_KEYS) if k in model_config]
            kind = model_config.get("model_type", "this model")
            has = f"; it has {', '.join(present)}" if present else "; it has no dropout keys"
            raise ConfigError(f"regularize.{setting}: {kind} has no such dropout setting{has}")
        changes.update({k: float(value) for k in found})
    return changes


def configured_dropout(cfg: Any, name_or_path: str) -> dict[str, float]:
    """The config overrides ``cfg.regularize`` asks for, for the model at ``name_or_path``."""
    r = cfg.regularize
    if r.hidden_dropout is None and r.attention_dropout is None:
        return {}

    return dropout_changes(read_model_config(name_or_path), r.hidden_dropout, r.attention_dropout)


def without_dropout(model: Any) -> Any:
    """Switch every dropout of ``model`` off, in place; returns it.

    ``torch.nn.Dropout`` modules get p = 0, and attention modules that keep
    their probability as a number (Llama's ``attention_dropout``) get 0. RL
    needs this: the log-probabilities stored when rollouts are sampled and
    those of the update must come from the same function, or the first
    update's probability ratio is not 1.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model
