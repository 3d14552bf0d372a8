"""Token classification (NER): one tag per word, entity-level metrics, entity spans.

Data are words with BIO tags (``data/tagged.py`` reads CoNLL and JSONL). The
tokenizer splits words into sub-tokens; the word's tag goes on its first
sub-token and the others are ignored (-100) in the loss, or, with
``task.label_all_subtokens``, they get the tag too (a ``B-`` word's
continuation pieces as ``I-``). Metrics and predictions always read the
first sub-token of each word, so they are word-level whatever the training
mode, and are computed against *every* gold word: words cut off by
``data.max_length`` count as predicted ``O`` (missed entities), never as
absent.

Features carry, besides the model inputs, ``word_ids`` (the word of each
sub-token, -100 for special tokens), ``word_labels`` (gold tag id per word)
and, for prediction, ``char_start``/``char_end`` (each sub-token's character
span in the record's text, from the tokenizer's offset mapping), so metrics
and entity spans need nothing but the prediction tensors and the records.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tunesmith.config.task_specs import TokenClassificationSpec
from tunesmith.data.cleaning import FileReport
from tunesmith.data.labels import build_label_list, check_labels
from tunesmith.data.pipeline import assemble_splits
from tunesmith.data.tagged import check_tag, load_tagged, text_record, word_spans
from tunesmith.errors import ConfigError, DataError, ModelError
from tunesmith.tasks.base import Batch, DataSplits, Feature, Task, register_task
from tunesmith.tasks.class_loss import ClassLoss
from tunesmith.tasks.encoding import (
    chunks,
    effective_limit,
    full_lengths,
    require_fast_tokenizer,
)
from tunesmith.tasks.metrics import entity_metrics

log = logging.getLogger(__name__)

#: "No word / no label" in token-level lists (special tokens, padding); -100 is
#: also what the loss ignores.
IGNORE = -100
#: Feature keys that are bookkeeping, not model inputs.
_BOOKKEEPING = ("word_ids", "word_labels", "char_start", "char_end")


@register_task
class TokenClassification(TokenClassificationSpec, ClassLoss, Task):
    """A tag per word (NER, BIO/IOBES) with a linear head on every token."""

    # -- data ---------------------------------------------------------------
    def load_records(
        self, path: str, *, labelled: bool = True, dropped: list[str] | None = None
    ) -> list[dict[str, Any]]:
        d = self.cfg.data
        return load_tagged(
            path,
            tokens_column=d.tokens_column,
            tags_column=d.tags_column if labelled else None,
            text_column=d.text_column,
            dropped=dropped,
        )

    def text_records(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Raw texts split into words by ``data.tagged.split_words`` (documented there)."""
        return [text_record(t, f"text {i}") for i, t in enumerate(texts)]

    def load_splits(self) -> DataSplits:
        """Read and split; the tag list comes from the whole training *file*.

        Taking the tags before validation/test are split off and
        ``max_train_samples`` caps the rest means a rare tag that lands only
        in a held-out part still gets its class (the model then misses it, and
        the metrics say so) instead of failing the run; tags of separately
        given validation/test files must be among them.
        """
        notes: list[str] = []
        file_tags: set[str] = set()

        def read(path: str, report: FileReport) -> list[dict[str, Any]]:
            records = self.read_dropping_empty(path, notes, "without tokens", report)
            self._check_listed(records)
            if path == self.cfg.data.train:
                file_tags.update(t for r in records for t in r["tags"])
            return records

        parts, provenance, split_notes, quality = assemble_splits(
            self.cfg.data, self.cfg.train.seed, read
        )
        labels = self._tag_list(file_tags)
        label2id = {lab: i for i, lab in enumerate(labels)}
        for split in ("validation", "test"):
            self.check_labels(parts[split], label2id, split)
        for split, records in parts.items():
            if records:
                entities = _entities(records)
                split_notes.append(f"{split}: {len(records)} sentences, {entities} entities")
        return DataSplits(
            train=parts["train"],
            validation=parts["validation"],
            test=parts["test"],
            labels=labels,
            provenance=provenance,
            notes=notes + split_notes,
            quality=quality,
        )

    def _tag_list(self, found: set[str]) -> list[str]:
        """``data.labels`` when given (their order is the class ids), else the ``found`` tags.

        Found tags are ordered ``O`` first, then by entity type, ``B-`` before
        ``I-``: stable across runs and readable in the model's ``id2label``.
        """
        if self.cfg.data.labels is None:
            return sorted(found, key=lambda t: (t != "O", t[2:], t[0]))
        labels = build_label_list([], self.cfg.data.labels)
        for tag in labels:
            try:
                check_tag(tag, "data.labels")
            except DataError as err:
                raise ConfigError(str(err)) from None
        return labels

    def _check_listed(self, records: Sequence[Mapping[str, Any]]) -> None:
        """With ``data.labels`` set, every tag of every file must be one of them."""
        if self.cfg.data.labels is None:
            return
        listed = set(build_label_list([], self.cfg.data.labels))
        for r in records:
            for i, tag in enumerate(r["tags"]):
                if tag not in listed:
                    raise DataError(
                        f"{r['source']}: tag {tag!r} (word {i + 1}, {r['words'][i]!r}) is not in "
                        "data.labels; add it there, or set data.labels to null to use every tag"
                    )

    def check_labels(
        self, records: Sequence[Mapping[str, Any]], label2id: Mapping[str, int], split: str
    ) -> None:
        """Every tag must be one the model was trained on; names the first word that is not."""
        unseen = [
            {"label": tag, "source": f"{r['source']} (word {i + 1}, {r['words'][i]!r})"}
            for r in records
            for i, tag in enumerate(r.get("tags") or ())
            if tag not in label2id
        ]
        check_labels(unseen, label2id, split)

    def token_lengths(
        self, records: Sequence[Mapping[str, Any]], tokenizer: Any
    ) -> dict[str, tuple[list[int], int]]:
        """Sub-tokens of each sentence's words (cut ones count as tagged ``O``)."""
        words = [r["words"] for r in records]
        lengths = full_lengths(tokenizer, words, is_split_into_words=True)
        return {"input": (lengths, effective_limit(tokenizer, self.cfg.data.max_length))}

    def encode(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        label2id: Mapping[str, int] | None,
    ) -> list[Feature]:
        require_fast_tokenizer(tokenizer, self.name, "word ids and character offsets")
        limit = effective_limit(tokenizer, self.cfg.data.max_length)
        predicting = label2id is None
        continuation = (
            continuation_ids(label2id) if label2id and self.cfg.task.label_all_subtokens else None
        )
        features: list[Feature] = []
        cut = 0
        for chunk in chunks(records):
            enc = _tokenize(tokenizer, [r["words"] for r in chunk], limit, offsets=predicting)
            for i, record in enumerate(chunk):
                word_ids = enc.word_ids(i)
                feature = {k: enc[k][i] for k in enc if k != "offset_mapping"}
                feature["word_ids"] = [IGNORE if w is None else w for w in word_ids]
                last = max((w for w in word_ids if w is not None), default=-1)
                cut += last + 1 < len(record["words"])
                if label2id is not None and record.get("tags") is not None:
                    tag_ids = [label2id[t] for t in record["tags"]]  # checked by check_labels
                    feature["labels"] = align_labels(word_ids, tag_ids, continuation)
                    feature["word_labels"] = tag_ids
                if predicting:
                    feature["char_start"], feature["char_end"] = char_offsets(
                        word_ids, enc["offset_mapping"][i], word_spans(record)
                    )
                features.append(feature)
        if cut:
            log.warning(
                "%d of %d sentences are longer than %d tokens and were cut; their remaining "
                "words count as tagged O (raise data.max_length to keep them)",
                cut,
                len(records),
                limit,
            )
        return features

    # -- model --------------------------------------------------------------
    def auto_class(self) -> Any:
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    def build_model(self, labels: Sequence[str], tokenizer: Any) -> torch.nn.Module:
        return self.load_with_head(labels)

    def model_inputs(self, batch: Batch) -> Batch:
        return {k: v for k, v in super().model_inputs(batch).items() if k not in _BOOKKEEPING}

    # -- loss and outputs ---------------------------------------------------
    def loss_logits(self, outputs: Any, batch: Batch) -> torch.Tensor:
        return _input_logits(outputs, batch)

    def outputs_to_predictions(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        score, pred = _input_logits(outputs, batch).detach().float().softmax(-1).max(-1)
        preds = {"pred": pred, "score": score}
        preds.update({k: batch[k] for k in _BOOKKEEPING if k in batch})
        return preds

    def compute_metrics(
        self, predictions: Mapping[str, torch.Tensor], labels: Sequence[str]
    ) -> dict[str, Any]:
        gold, found = [], []
        rows = zip(
            predictions["word_ids"].tolist(),
            predictions["pred"].tolist(),
            predictions["word_labels"].tolist(),
            strict=True,
        )
        for word_ids, pred, word_labels in rows:
            tags = [labels[i] for i in word_labels if i != IGNORE]
            positions = word_positions(word_ids)
            gold.append(tags)
            found.append(word_tags(pred, positions, len(tags), labels))
        types = sorted({lab[2:] for lab in labels if lab != "O"})
        return entity_metrics(gold, found, types)

    def format_predictions(
        self,
        predictions: Mapping[str, torch.Tensor],
        labels: Sequence[str],
        records: Sequence[Mapping[str, Any]],
    ) -> list[dict[str, Any]]:
        """Entities ``{type, start, end, text, score}`` with character offsets into ``text``.

        ``score`` is the mean probability of the predicted tags over the
        entity's words; ``words`` and ``tags`` give the word-level view.
        """
        from seqeval.metrics.sequence_labeling import get_entities

        columns = ("word_ids", "pred", "score", "char_start", "char_end")
        out = []
        for record, *row in zip(records, *(predictions[k].tolist() for k in columns), strict=True):
            word_ids, pred, score, starts, ends = row
            positions = word_positions(word_ids)
            tags = word_tags(pred, positions, len(record["words"]), labels)
            entities = []
            for kind, first, last in get_entities(tags):
                start, end = starts[positions[first][0]], ends[positions[last][1]]
                probs = [score[positions[w][0]] for w in range(first, last + 1)]
                entities.append(
                    {
                        "type": kind,
                        "start": start,
                        "end": end,
                        "text": record["text"][start:end],
                        "score": round(sum(probs) / len(probs), 6),
                    }
                )
            out.append({"entities": entities, "words": record["words"], "tags": tags})
        return out


# -- alignment (module functions: tested directly) ------------------------------
def align_labels(
    word_ids: Sequence[int | None],
    word_labels: Sequence[int],
    continuation: Mapping[int, int] | None = None,
) -> list[int]:
    """Token-level label ids from word-level ones.

    Args:
        word_ids: The word of each sub-token (None for special tokens).
        word_labels: The label id of each word.
        continuation: None: only a word's first sub-token is labelled, the
            rest get -100 (ignored by the loss). A mapping: every sub-token is
            labelled, continuation pieces with ``continuation.get(id, id)``
            (``B-X`` -> ``I-X``, see ``continuation_ids``).

    Returns:
        One id per sub-token, -100 where nothing is learned.
    """
    out: list[int] = []
    previous = None
    for word in word_ids:
        if word is None:
            out.append(IGNORE)
        elif word != previous:
            out.append(word_labels[word])
        elif continuation is None:
            out.append(IGNORE)
        else:
            out.append(continuation.get(word_labels[word], word_labels[word]))
        previous = word
    return out


def continuation_ids(label2id: Mapping[str, int]) -> dict[int, int]:
    """``B-X`` id -> ``I-X`` id for every type with both: a word's later pieces are inside it."""
    return {
        i: label2id["I-" + tag[2:]]
        for tag, i in label2id.items()
        if tag.startswith("B-") and "I-" + tag[2:] in label2id
    }


def char_offsets(
    word_ids: Sequence[int | None],
    offsets: Sequence[tuple[int, int]],
    spans: Sequence[tuple[int, int]],
) -> tuple[list[int], list[int]]:
    """Each sub-token's character span in the text, -100 for special tokens.

    With pre-split words the tokenizer's offsets are relative to each word,
    so they are shifted by the word's start in the text.
    """
    starts, ends = [], []
    for word, (start, end) in zip(word_ids, offsets, strict=True):
        base = spans[word][0] if word is not None else None
        starts.append(IGNORE if base is None else base + start)
        ends.append(IGNORE if base is None else base + end)
    return starts, ends


def word_positions(word_ids: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Word -> (first, last) sub-token position; words cut off or without tokens are absent."""
    positions: dict[int, tuple[int, int]] = {}
    for pos, word in enumerate(word_ids):
        if word >= 0:
            positions[word] = (positions.get(word, (pos, pos))[0], pos)
    return positions


def word_tags(
    pred: Sequence[int],
    positions: Mapping[int, tuple[int, int]],
    n_words: int,
    labels: Sequence[str],
) -> list[str]:
    """The tag predicted at each word's first sub-token; ``O`` for words with none."""
    return [labels[pred[positions[w][0]]] if w in positions else "O" for w in range(n_words)]


def _tokenize(tokenizer: Any, words: list[list[str]], limit: int, *, offsets: bool) -> Any:
    try:
        return tokenizer(
            words,
            is_split_into_words=True,
            truncation=True,
            max_length=limit,
            return_offsets_mapping=offsets,
        )
    except ValueError as err:
        if "add_prefix_space" not in str(err):
            raise
        raise ModelError(
            f"{tokenizer.name_or_path}: this byte-level BPE tokenizer needs add_prefix_space=True "
            "for pre-split words; save it that way (AutoTokenizer.from_pretrained(folder, "
            "add_prefix_space=True).save_pretrained(folder))"
        ) from err


def _input_logits(outputs: Any, batch: Batch) -> torch.Tensor:
    """Logits of the input's positions: prompt tuning prepends virtual tokens, cut them off."""
    return outputs.logits[:, -batch["input_ids"].shape[1] :]


def _entities(records: Sequence[Mapping[str, Any]]) -> int:
    """Gold entities in ``records`` (for the log: F1 on few entities is noisy)."""
    from seqeval.metrics.sequence_labeling import get_entities

    return sum(len(get_entities(list(r["tags"]))) for r in records if r.get("tags"))
