"""Building a run's augmentation from its config: synonyms, translator, masking.

Kept apart from the operations so that they stay free of models and files,
and so ``train`` and ``data augment --show`` build exactly the same thing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tunesmith.data.augment.apply import Augmenter, AugmentStats
from tunesmith.data.augment.back_translation import BackTranslator
from tunesmith.data.augment.masking import MaskedFeatureDataset, mask_token_id
from tunesmith.data.augment.synonyms import EmbeddingSynonyms, WordNetSynonyms, find_wordnet
from tunesmith.data.batching import FeatureDataset
from tunesmith.models.loading import load_pretrained

if TYPE_CHECKING:
    import torch

    from tunesmith.config.root import Config

log = logging.getLogger(__name__)

#: EDA operations that need a synonym source.
_SYNONYM_OPS = ("synonym_replacement", "random_insertion")


def build_augmenter(
    cfg: Config, tokenizer: Any, embeddings: torch.Tensor | None = None
) -> Augmenter:
    """The run's augmenter (``embeddings``: the model's input-embedding matrix).

    Raises:
        ConfigError: The synonym source or a translation model cannot be loaded.
    """
    aug = cfg.data.augment
    synonyms = None
    if any(op in aug.eda_weights() for op in _SYNONYM_OPS):
        if aug.synonyms == "wordnet":
            synonyms = WordNetSynonyms(find_wordnet(aug.wordnet_dir))
        else:
            if embeddings is None:
                embeddings = input_embeddings(cfg)
            synonyms = EmbeddingSynonyms(tokenizer, embeddings, aug.embedding_neighbours)
    translator = None
    if aug.back_translation is not None and aug.back_translation.probability > 0:
        translator = BackTranslator(
            aug.back_translation, trust_remote_code=cfg.model.trust_remote_code
        )
    return Augmenter(aug, cfg.train.seed, synonyms, translator)


def input_embeddings(cfg: Config) -> torch.Tensor:
    """The input-embedding matrix of the configured base model (loaded without a head)."""
    from transformers import AutoModel

    model = load_pretrained(
        AutoModel, cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code
    )
    return model.get_input_embeddings().weight.detach()


def augment_training(
    cfg: Config, records: Sequence[dict[str, Any]], tokenizer: Any, model: Any = None
) -> tuple[list[dict[str, Any]], AugmentStats]:
    """The training records with their copies; logs what was added."""
    embeddings = None
    if model is not None and cfg.data.augment.synonyms == "embeddings":
        embeddings = model.get_input_embeddings().weight.detach()
    out, stats = build_augmenter(cfg, tokenizer, embeddings)(records)
    log.info("%s", stats.summary())
    return out, stats


def training_dataset(cfg: Config, features: list[dict[str, Any]], tokenizer: Any) -> FeatureDataset:
    """The training features, masked anew each epoch when ``dynamic_masking`` is set."""
    rate = cfg.data.augment.dynamic_masking
    if not rate:
        return FeatureDataset(features)
    special = set(getattr(tokenizer, "all_special_ids", []))
    if tokenizer.pad_token_id is not None:
        special.add(tokenizer.pad_token_id)
    log.info("dynamic masking: %.0f%% of each example's tokens, drawn anew every epoch", 100 * rate)
    return MaskedFeatureDataset(features, rate, mask_token_id(tokenizer), special, cfg.train.seed)
