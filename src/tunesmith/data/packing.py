"""Padding-free training batches for causal LMs: the batch's examples in one row.

Why: chats differ in length a lot more than review snippets, and every pad
token of a padded batch costs a full pass through every layer. Packed, a
batch of B examples is one row of their real tokens only, with
``position_ids`` restarting at 0 for each example. Given ``position_ids`` and
no ``attention_mask``, transformers' mask builder (``masking_utils``) finds
where each example starts and keeps attention within each one, so a token
never sees another example; the logits equal those of the padded batch.

The first label of each example is ignored: a causal LM's loss predicts token
``t + 1`` from position ``t``, and across a boundary that would train the
last token of one example to predict the first of the next. In a padded
batch that first label is never a target either (nothing precedes it), so
the targets, and hence the loss sum and its normalisation, are the same.

The same mechanism trains raw text for continued pre-training
(``data.packing: documents``): ``pack_documents`` fills ``max_length``
blocks with whole documents, each block carrying ``position_ids`` that
restart at every document, and the collator concatenates a batch's blocks
into one row as it does examples. ``concat_blocks`` is GPT-2's scheme: one
token stream cut into blocks, attention crossing documents.

Training only: evaluation and generation score or decode each example on its
own row, so they keep the padded collator. Where packed rows would change the
results (encoder tasks, virtual tokens, distillation), config validation
refuses ``data.padding_free`` (``config/checks.py``: the ``packable`` flags of
the task and method specs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from tunesmith.data.batching import IGNORE


class PackedCollator:
    """Concatenates a batch's ``input_ids`` (and ``labels``) into one row of real tokens.

    Returns ``input_ids``, ``position_ids`` and ``labels`` of shape ``[1, total]``
    (plus ``index`` when the features carry one); no ``attention_mask``, so the
    model derives the per-example causal mask from ``position_ids``. A feature
    that is itself a block of documents brings its own ``position_ids`` and labels.
    """

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids: list[int] = []
        positions: list[int] = []
        labels: list[int] = []
        for feature in features:
            row = list(feature["input_ids"])
            ids += row
            positions += feature.get("position_ids", range(len(row)))
            own = list(feature.get("labels", row))
            labels += [IGNORE, *own[1:]] if own else []
        batch = {
            "input_ids": torch.tensor([ids]),
            "position_ids": torch.tensor([positions]),
            "labels": torch.tensor([labels]),
        }
        if "index" in features[0]:
            batch["index"] = torch.tensor([f["index"] for f in features])
        return batch


def pack_documents(documents: Sequence[Mapping[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Whole documents (features of at most ``limit`` tokens) packed in order into blocks.

    A block takes documents until the next would overflow ``limit``; its
    ``position_ids`` restart at each document and the first label of each is
    ignored (nothing of the document precedes it), so each document's loss is
    what it would be alone.
    """
    blocks: list[dict[str, Any]] = []
    block: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for doc in documents:
        ids = list(doc["input_ids"])
        if block["input_ids"] and len(block["input_ids"]) + len(ids) > limit:
            blocks.append(_with_mask(block))
            block = {"input_ids": [], "labels": [], "position_ids": []}
        block["input_ids"] += ids
        block["labels"] += [IGNORE, *list(doc.get("labels", ids))[1:]]
        block["position_ids"] += range(len(ids))
    if block["input_ids"]:
        blocks.append(_with_mask(block))
    return blocks


def concat_blocks(documents: Sequence[Mapping[str, Any]], limit: int) -> list[dict[str, Any]]:
    """GPT-2 style: every document's tokens in one stream, cut into ``limit``-token blocks."""
    stream = [t for doc in documents for t in doc["input_ids"]]
    return [
        _with_mask({"input_ids": part, "labels": list(part)})
        for part in (stream[i : i + limit] for i in range(0, len(stream), limit))
    ]


def _with_mask(block: dict[str, list[int]]) -> dict[str, Any]:
    return {**block, "attention_mask": [1] * len(block["input_ids"])}


def training_loader(
    train_set: Any, batch_size: int, sampler: Any, collator: Any, padding_free: bool, acc: Any
) -> DataLoader:
    """The training DataLoader: packed rows with ``padding_free``, else ``collator``'s batches.

    Features are pre-tokenised, so collating in the main process keeps up; on a
    GPU, pinned pages let the copy to the device overlap with compute.
    """
    return DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=PackedCollator() if padding_free else collator,
        pin_memory=acc.device.type == "cuda",
    )


def real_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens of a batch that are not padding (a packed batch has none; 0 when unknown)."""
    if "attention_mask" in batch:  # a preference pair's rejected reply has its own mask
        masks = ("attention_mask", "rejected_attention_mask")
        return sum(int(batch[k].sum()) for k in masks if k in batch)
    if "position_ids" in batch and "input_ids" in batch:
        return int(batch["input_ids"].numel())
    return 0
