"""A student made of some of the teacher's own blocks (``distill.student_layers``).

Keeping every other block of a fine-tuned teacher, with its embeddings and
head, starts the student far closer to the teacher than a random or
pretrained-only model of that size (the DistilBERT initialisation); the
distillation loss then repairs what the missing blocks did. The result is a
plain transformers model whose config says the new depth, so it saves,
reloads and exports like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from tunesmith.errors import ConfigError, ModelError
from tunesmith.models.dropout import configured_dropout
from tunesmith.models.layers import discover_layers
from tunesmith.models.loading import checkpoint_manifest, load_pretrained

log = logging.getLogger(__name__)

#: ``config`` keys holding the number of blocks, by architecture family.
_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")


def keep_indices(total: int, wanted: int | Sequence[int]) -> list[int]:
    """Block indices to keep: ``wanted`` as given, or N evenly spaced (first and last kept).

    Raises:
        ConfigError: More blocks than the teacher has, or an index out of range.
    """
    if isinstance(wanted, int):
        if wanted > total:
            raise ConfigError(
                f"distill.student_layers: {wanted} blocks asked, the teacher has {total}"
            )
        if wanted == 1:
            return [total - 1]
        return sorted({round(i * (total - 1) / (wanted - 1)) for i in range(wanted)})
    bad = [i for i in wanted if i >= total]
    if bad:
        raise ConfigError(
            f"distill.student_layers: block {bad[0]} does not exist (the teacher has {total}: "
            f"0..{total - 1})"
        )
    return sorted(wanted)


def shrink(model: nn.Module, wanted: int | Sequence[int]) -> list[int]:
    """Keep only some blocks of ``model``'s single block stack, in place; returns their indices.

    Raises:
        ModelError: The model has no single block stack (encoder-decoders).
    """
    stacks = discover_layers(model).stacks
    if len(stacks) != 1:
        raise ModelError(
            f"distill.student_layers: {type(model).__name__} has {len(stacks)} block stacks; "
            "only single-stack models (encoders, decoders) can be shrunk"
        )
    parent, _, attr = stacks[0].rpartition(".")
    container = model.get_submodule(parent) if parent else model
    blocks = getattr(container, attr)
    keep = keep_indices(len(blocks), wanted)
    kept = nn.ModuleList([blocks[i] for i in keep])
    setattr(container, attr, kept)
    for key in _DEPTH_KEYS:
        if getattr(model.config, key, None) == len(blocks):
            setattr(model.config, key, len(keep))
    for new_index, block in enumerate(kept):  # decoders index their KV cache by layer
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    return keep


def build_student(cfg: Any, task: Any, labels: Sequence[str]) -> nn.Module:
    """The teacher checkpoint with only ``distill.student_layers`` of its blocks.

    Raises:
        ConfigError: The teacher is an adapter checkpoint or has other labels.
    """
    from pathlib import Path

    d, m = cfg.distill, cfg.model
    manifest = checkpoint_manifest(Path(d.teacher))
    if manifest.get("adapter"):
        raise ConfigError(
            f"distill.student_layers: the teacher {d.teacher} is an adapter checkpoint; "
            "export it merged (tunesmith export --merge) and use that folder"
        )
    if list(manifest.get("labels", [])) != list(labels):
        raise ConfigError(
            f"distill.teacher: its labels {manifest.get('labels')} differ from the run's "
            f"{list(labels)} (same labels, same order)"
        )
    model = load_pretrained(
        task.auto_class(),
        d.teacher,
        trust_remote_code=m.trust_remote_code,
        allow_unsafe_weights=m.allow_unsafe_weights,
        **configured_dropout(cfg, d.teacher),
    )
    keep = shrink(model, d.student_layers)
    log.info("student: blocks %s of the teacher %s", keep, d.teacher)
    return model
