"""Dynamic masking: a new share of each example's tokens hidden every epoch.

Token-level noise in the inputs (replacing tokens by the mask token, or the
unknown token for tokenizers without one) keeps a small training set from
being memorised word for word; drawing the masks anew each epoch means the
model never sees the same corrupted example twice. Labels are untouched, so
token labels stay aligned. Special tokens ([CLS], [SEP], padding) are never
masked. The mask of an example depends only on (seed, epoch, index): the
same in every process of a distributed run and after a resume.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

from tunesmith.data.batching import FeatureDataset
from tunesmith.data.perturb import count_for
from tunesmith.errors import ConfigError


class MaskedFeatureDataset(FeatureDataset):
    """Training features whose ``input_ids`` are masked anew each epoch.

    Args:
        features: Pre-tokenised training features.
        rate: Share of each example's maskable tokens replaced.
        mask_id: Token id written in their place.
        special_ids: Token ids never masked.
        seed: The run's seed.
    """

    #: The inputs change between epochs: cached hidden states would be stale.
    fixed_inputs = False

    def __init__(
        self,
        features: Sequence[dict[str, Any]],
        rate: float,
        mask_id: int,
        special_ids: Iterable[int],
        seed: int,
    ) -> None:
        super().__init__(features)
        self.rate, self.mask_id, self.seed = rate, mask_id, seed
        self.special = frozenset(special_ids)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose masks ``__getitem__`` applies."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = super().__getitem__(i)
        ids = list(item["input_ids"])
        eligible = [j for j, t in enumerate(ids) if t not in self.special]
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        for j in rng.sample(eligible, count_for(self.rate, len(eligible), rng)):
            ids[j] = self.mask_id
        item["input_ids"] = ids
        return item


def mask_token_id(tokenizer: Any) -> int:
    """The mask token's id, else the unknown token's.

    Raises:
        ConfigError: The tokenizer has neither.
    """
    for name in ("mask_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ConfigError(
        "data.augment.dynamic_masking: the tokenizer has no mask or unknown token to mask "
        "with; set dynamic_masking: 0"
    )
