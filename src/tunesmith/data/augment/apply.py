"""Adding augmented copies to the training records, and what was made.

Copies are drawn from one seeded generator in record order, so the same
config and data give the same copies; back-translations are then made in
batches (each distinct text translated once). A copy equal to its source or
to an earlier copy of it is dropped and counted, never kept as a silent
duplicate. Each copy's ``source`` names its original row and how it was
made, so a surprising example can be traced back.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tunesmith.config.augment import AugmentConfig
from tunesmith.data.augment.eda import draw_ops, edit_words
from tunesmith.data.augment.synonyms import SynonymSource

log = logging.getLogger(__name__)

Record = dict[str, Any]
#: Record fields holding a text EDA edits and back-translation translates.
TEXT_FIELDS = ("text", "text_pair")
#: Name of back-translation in ``by_op`` and in copies' sources.
BACK_TRANSLATION = "back_translation"


@dataclass
class AugmentStats:
    """What augmentation added to the training split."""

    examples: int = 0
    added: int = 0
    identical: int = 0
    by_op: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        """One line for the training log."""
        ops = ", ".join(f"{op} {n}" for op, n in sorted(self.by_op.items()))
        return (
            f"augmentation: {self.added} copies added to {self.examples} training examples "
            f"({ops}); {self.identical} copies identical to their source or another copy "
            "dropped"
        )


@dataclass
class Copy:
    """One augmented copy before de-duplication."""

    origin: int
    number: int
    ops: list[str]
    record: Record


class Augmenter:
    """Makes ``cfg.multiplier`` copies of each training record.

    Args:
        cfg: The ``data.augment`` section.
        seed: The run's seed.
        synonyms: Synonym source of the EDA operations that need one.
        translator: Texts -> back-translated texts (None: no back-translation).
    """

    def __init__(
        self,
        cfg: AugmentConfig,
        seed: int,
        synonyms: SynonymSource | None,
        translator: Callable[[Sequence[str]], list[str]] | None = None,
    ) -> None:
        self.cfg, self.seed = cfg, seed
        self.synonyms = synonyms
        self.translator = translator
        self.weights = cfg.eda_weights()

    def copies(self, records: Sequence[Mapping[str, Any]]) -> list[Copy]:
        """Every copy of every record, in record order, identical ones included."""
        rng = random.Random(f"augment:{self.seed}")
        bt = self.cfg.back_translation
        made: list[Copy] = []
        for i, rec in enumerate(records):
            for k in range(1, self.cfg.multiplier + 1):
                if self.translator is not None and bt is not None and rng.random() < bt.probability:
                    made.append(Copy(i, k, [BACK_TRANSLATION], dict(rec)))
                    continue
                ops = draw_ops(self.weights, rng)
                made.append(Copy(i, k, ops, self._edit(rec, ops, rng)))
        self._back_translate([c for c in made if c.ops == [BACK_TRANSLATION]])
        return made

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> tuple[list[Record], AugmentStats]:
        """The records followed by their distinct copies, and the counts."""
        stats = AugmentStats(examples=len(records))
        seen: dict[int, set[tuple[Any, ...]]] = {}
        added: list[Record] = []
        for copy in self.copies(records):
            keys = seen.setdefault(copy.origin, {content(records[copy.origin])})
            key = content(copy.record)
            if key in keys:
                stats.identical += 1
                continue
            keys.add(key)
            origin = records[copy.origin]["source"]
            copy.record["source"] = f"{origin} (augmented {copy.number}: {'+'.join(copy.ops)})"
            stats.added += 1
            stats.by_op.update(copy.ops)
            added.append(copy.record)
        return [dict(r) for r in records] + added, stats

    def _edit(self, record: Mapping[str, Any], ops: list[str], rng: random.Random) -> Record:
        out = dict(record)
        rate, synonyms = self.cfg.word_rate, self.synonyms
        assert synonyms is not None or not {"synonym_replacement", "random_insertion"} & set(ops)
        if isinstance(out.get("words"), list):  # word-tagged (NER): tags stay aligned
            out["words"], out["tags"] = edit_words(
                out["words"], out.get("tags"), ops, rate, synonyms, rng
            )
            out["text"] = " ".join(out["words"])
            return out
        for name in TEXT_FIELDS:
            if isinstance(out.get(name), str):
                words, _ = edit_words(out[name].split(), None, ops, rate, synonyms, rng)
                out[name] = " ".join(words)
        return out

    def _back_translate(self, copies: list[Copy]) -> None:
        if not copies or self.translator is None:
            return
        texts = list(
            dict.fromkeys(c.record[n] for c in copies for n in TEXT_FIELDS if c.record.get(n))
        )
        log.info("back-translating %d texts", len(texts))
        translated = dict(zip(texts, self.translator(texts), strict=True))
        for c in copies:
            for name in TEXT_FIELDS:
                if c.record.get(name):
                    c.record[name] = translated[c.record[name]] or c.record[name]


def content(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes two records the same example (the source row aside)."""
    words = record.get("words")
    return (
        tuple(words) if isinstance(words, list) else None,
        tuple(record.get("tags") or ()),
        *(record.get(n) for n in TEXT_FIELDS),
        record.get("label"),
    )
