"""The ``data.augment`` section: how many augmented copies, made how.

Each augmented copy of a training example is either a back-translation (with
``back_translation.probability``) or an EDA edit: every EDA operation fires
independently with its own probability, and when none fires one of them is
drawn in proportion to those probabilities, so a copy always differs from its
source. ``word_rate`` is EDA's alpha: the share of a text's words that one
operation touches. Validation and test data are never augmented.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tunesmith.config.base import Section

#: The EDA operations, in the order they are applied to a copy.
EDA_OPS = ("synonym_replacement", "random_insertion", "random_swap", "random_deletion")


class BackTranslationConfig(Section):
    """Two local translation models: data language -> pivot -> data language."""

    forward: str = Field(
        ..., min_length=1, description="Folder of a seq2seq model translating into the pivot."
    )
    backward: str = Field(
        ..., min_length=1, description="Folder of a seq2seq model translating back."
    )
    probability: float = Field(
        0.5, ge=0, le=1, description="Share of augmented copies made by back-translation."
    )
    num_beams: int = Field(1, gt=0, description="Beam width of both translations.")
    batch_size: int = Field(16, gt=0, description="Texts translated per generate call.")
    max_length: int = Field(128, gt=0, description="Tokens per translated text.")


class AugmentConfig(Section):
    """Seeded augmentation of the training split (off while ``multiplier`` is 0)."""

    multiplier: int = Field(
        0, ge=0, le=64, description="Augmented copies added per training example; 0: none."
    )
    word_rate: float = Field(
        0.1, gt=0, le=0.5, description="Share of a text's words one EDA operation touches."
    )
    synonym_replacement: float = Field(
        0.25, ge=0, le=1, description="Probability that a copy has words replaced by synonyms."
    )
    random_insertion: float = Field(
        0.25, ge=0, le=1, description="Probability that a copy has synonyms inserted."
    )
    random_swap: float = Field(
        0.25, ge=0, le=1, description="Probability that a copy has word pairs swapped."
    )
    random_deletion: float = Field(
        0.25, ge=0, le=1, description="Probability that a copy has words deleted."
    )
    synonyms: Literal["wordnet", "embeddings"] = Field(
        "wordnet",
        description="Synonym source: WordNet (offline database) or the nearest whole-word "
        "neighbours in the model's own input-embedding matrix.",
    )
    wordnet_dir: str | None = Field(
        None,
        description="Folder of the WordNet database files (index.noun, data.noun, ...); "
        "null: $WORDNET_DIR, then /usr/share/wordnet.",
    )
    embedding_neighbours: int = Field(
        10, gt=0, description="synonyms: embeddings: neighbours considered per word."
    )
    back_translation: BackTranslationConfig | None = Field(
        None, description="Back-translation through two local translation models."
    )
    dynamic_masking: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of each training example's tokens replaced by the mask (or unk) "
        "token, drawn anew every epoch; 0: off.",
    )

    @model_validator(mode="after")
    def _something_to_do(self) -> AugmentConfig:
        if self.multiplier and not self.eda_weights() and self.back_translation is None:
            raise ValueError(
                "multiplier > 0 but every operation has probability 0 and there is no "
                "back_translation: give one operation a probability above 0"
            )
        bt = self.back_translation
        if self.multiplier and bt is not None and bt.probability < 1 and not self.eda_weights():
            raise ValueError(
                "back_translation.probability < 1 leaves copies to EDA, whose operations "
                "all have probability 0"
            )
        return self

    @property
    def enabled(self) -> bool:
        """Whether new training examples are made (dynamic masking aside)."""
        return self.multiplier > 0

    def eda_weights(self) -> dict[str, float]:
        """The EDA operations with a probability above 0."""
        return {op: getattr(self, op) for op in EDA_OPS if getattr(self, op) > 0}
