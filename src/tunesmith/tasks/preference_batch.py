"""A batch of preference features as the model takes it: one forward for both replies.

The collator pads each key on its own; here chosen and rejected rows become
one right-padded batch (chosen first, as TRL orders them) with the mask of
the reply tokens, and KTO's mismatched rows get theirs.
"""

from __future__ import annotations

import torch

Batch = dict[str, torch.Tensor]


def reply_mask(attention_mask: torch.Tensor, prompt_length: torch.Tensor) -> torch.Tensor:
    """(rows, width) bool: the real tokens at or after each right-padded row's prompt length."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return attention_mask.bool() & (positions[None, :] >= prompt_length[:, None])


def real_rows(ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row's real tokens, whichever side the collator padded."""
    return [row[keep.bool()] for row, keep in zip(ids, mask, strict=True)]


def right_padded(
    rows: list[torch.Tensor], pad_id: int, prompt_length: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows right-padded to one width (positions then count from each row's first token).

    Returns ids, attention mask and the reply mask (tokens from ``prompt_length`` on).
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask, reply_mask(mask, prompt_length)


def stack_pairs(batch: Batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows in one batch: ids, attention mask, reply mask."""
    rows = real_rows(batch["input_ids"], batch["attention_mask"])
    rows += real_rows(batch["rejected_input_ids"], batch["rejected_attention_mask"])
    return right_padded(rows, pad_id, batch["prompt_length"].repeat(2))


def kto_batch(batch: Batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO's rows (prompt + own completion): ids, attention mask, reply mask."""
    rows = real_rows(batch["input_ids"], batch["attention_mask"])
    return right_padded(rows, pad_id, batch["prompt_length"])


def mismatched_batch(batch: Batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO's mismatched rows (each prompt with another row's completion), as ``kto_batch``."""
    rows = real_rows(batch["kl_input_ids"], batch["kl_attention_mask"])
    return right_padded(rows, pad_id, batch["prompt_length"])
