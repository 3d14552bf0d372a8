"""Sequence to sequence (``AutoModelForSeq2SeqLM``: T5, BART, ...): source text in, target out.

Records come from two text columns, ``data.source_column`` (kept under the
record key ``text``, so ``predict`` echoes the input like every task) and
``data.target_column`` (``target``). The source is cut at ``data.max_length``
(or the model's position table), the target at ``data.max_target_length``,
always ending in EOS so the model learns where to stop.

Training is teacher-forced: the decoder sees the labels shifted right behind
the model's decoder start token, built here from the labels (not by the model
from ``labels``, which would also make it compute a second, unused loss over
the whole vocabulary). The loss is token cross-entropy with
``task.label_smoothing``, summed over target tokens.

Evaluation reports the loss always, and BLEU and chrF (``sacrebleu`` corpus
scores, 0-100) of the generated text when generation runs
(``generate.in_eval``; ``generate.eval_samples`` limits it to the first N
validation examples). References are the decoded label ids, i.e. the targets
as the tokenizer sees them (cut at ``data.max_target_length``, unknown
characters lost), the same text the model is trained to produce.

State: the task keeps the tokenizer given to ``encode`` (to decode in
``compute_metrics``/``format_predictions``) and the decoder start and pad ids
of the model it built or loaded (to build decoder inputs in ``model_inputs``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from tunesmith.config.task_specs import Seq2SeqSpec
from tunesmith.data.loading import load_records
from tunesmith.errors import ModelError
from tunesmith.tasks.base import Batch, DataSplits, Feature, Task, register_task
from tunesmith.tasks.encoding import chunks, effective_limit, full_lengths
from tunesmith.tasks.generation import NO_TOKEN, decode, generate_ids, generated_rows
from tunesmith.tasks.losses import IGNORE, token_cross_entropy_sum
from tunesmith.tasks.truncation import TruncationReport, lengths_cut

if TYPE_CHECKING:
    from tunesmith.config.root import Config

log = logging.getLogger(__name__)


@register_task
class Seq2Seq(Seq2SeqSpec, Task):
    """Text to text with an encoder-decoder LM: translation, summarisation, rewriting."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        #: The tokenizer of the last ``encode`` call: decodes generated and label ids.
        self.tokenizer: Any = None
        #: ``(decoder start id, pad id)`` of the model built or loaded by this task.
        self.decoder_ids: tuple[int, int] | None = None

    # -- data ---------------------------------------------------------------
    def load_records(
        self, path: str, *, labelled: bool = True, dropped: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Records ``{"text": source, "target": target, "source": "file:line"}``."""
        d = self.cfg.data
        return load_records(
            path,
            text_column=d.source_column,
            target_column=d.target_column if labelled else None,
            label_column=None,
            dropped=dropped,
            config_keys={"text": "data.source_column"},
        )

    def load_splits(self) -> DataSplits:
        """Read and split at random (there is no label to stratify by)."""
        return self.split_free_text("with an empty source or target")

    def check_labels(
        self, records: Sequence[Mapping[str, Any]], label2id: Mapping[str, int], split: str
    ) -> None:
        """Nothing to check: targets are free text, there is no label vocabulary."""

    def token_lengths(
        self, records: Sequence[Mapping[str, Any]], tokenizer: Any
    ) -> dict[str, tuple[list[int], int]]:
        """Source tokens (``data.max_length``) and target tokens (``data.max_target_length``)."""
        lengths = super().token_lengths(records, tokenizer)
        targets = [r["target"] for r in records if r.get("target") is not None]
        if targets:
            limit = effective_limit(tokenizer, self.cfg.data.max_target_length)
            lengths["target"] = (full_lengths(tokenizer, targets, target=True), limit)
        return lengths

    def encode(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        label2id: Mapping[str, int] | None,
    ) -> list[Feature]:
        """Source ids and, for records with a target, label ids ending in EOS.

        ``label2id`` is unused (no label vocabulary): records carry a ``target``
        or not (prediction input).
        """
        self.tokenizer = tokenizer
        d = self.cfg.data
        limits = {
            "source": effective_limit(tokenizer, d.max_length),
            "target": effective_limit(tokenizer, d.max_target_length),
        }
        features: list[Feature] = []
        full = {"source": 0, "target": 0}  # rows that reached their limit
        for chunk in chunks(records):
            enc = tokenizer(
                [r["text"] for r in chunk], truncation=True, max_length=limits["source"]
            )
            labelled = [i for i, r in enumerate(chunk) if r.get("target") is not None]
            targets = [chunk[i]["target"] for i in labelled]
            labels = target_ids(tokenizer, targets, limits["target"]) if targets else []
            full["source"] += sum(len(row) >= limits["source"] for row in enc["input_ids"])
            full["target"] += sum(len(row) >= limits["target"] for row in labels)
            label_of = dict(zip(labelled, labels, strict=True))
            for i in range(len(chunk)):
                feature = {k: enc[k][i] for k in ("input_ids", "attention_mask")}
                if i in label_of:
                    feature["labels"] = label_of[i]
                features.append(feature)
        for side, key in (("source", "max_length"), ("target", "max_target_length")):
            if full[side]:
                log.warning(
                    "%d of %d %ss reached the %d-token limit and may have been cut (data.%s)",
                    full[side],
                    len(records),
                    side,
                    limits[side],
                    key,
                )
        return features

    def truncation(self, records: Sequence[Mapping[str, Any]], tokenizer: Any) -> TruncationReport:
        """Targets against ``data.max_target_length``, sources against ``data.max_length``."""
        d, eos = self.cfg.data, tokenizer.eos_token_id
        limit, input_limit = (
            effective_limit(tokenizer, n) for n in (d.max_target_length, d.max_length)
        )
        end = None if eos is None else tokenizer.convert_ids_to_tokens(eos)
        report = TruncationReport("data.max_target_length", limit, end, input_limit=input_limit)
        pairs = [r for r in records if r.get("target") is not None]
        inputs = full_lengths(tokenizer, [r["text"] for r in pairs])
        for chunk, ins in zip(chunks(pairs), chunks(inputs), strict=True):
            targets = full_target_ids(tokenizer, [r["target"] for r in chunk])
            for record, n_in, ids in zip(chunk, ins, targets, strict=True):
                report.rows.append(
                    lengths_cut(
                        record["source"],
                        len(ids),
                        limit,
                        inputs=n_in,
                        input_limit=input_limit,
                        has_end=eos is not None,
                    )
                )
        return report

    # -- model --------------------------------------------------------------
    def auto_class(self) -> Any:
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM

    def build_model(self, labels: Sequence[str], tokenizer: Any) -> torch.nn.Module:
        """The configured model with its own LM head (no new head: ``labels`` is empty)."""
        model = self.load_configured()
        self.decoder_ids = decoder_ids(model, tokenizer, self.cfg.model.name_or_path)
        return model

    def loaded(self, model: Any, tokenizer: Any, path: str) -> None:
        """The decoder's start and end ids as the saved model has them."""
        self.decoder_ids = decoder_ids(model, tokenizer, path)

    def model_inputs(self, batch: Batch) -> Batch:
        """Encoder inputs plus decoder inputs: the labels shifted right behind the start token.

        Without labels (prediction) the decoder gets one token: the forward pass
        only has to run, its output is unused (text comes from ``generate``), so
        this works also for a task that never saw the model (adapter library).
        """
        inputs = super().model_inputs(batch)
        labels = batch.get("labels")
        if labels is None:
            start = self.decoder_ids[0] if self.decoder_ids is not None else 0
            inputs["decoder_input_ids"] = torch.full_like(batch["input_ids"][:, :1], start)
            return inputs
        if self.decoder_ids is None:
            raise RuntimeError("seq2seq: build_model or load_trained must run before training")
        inputs["decoder_input_ids"] = shift_right(labels, *self.decoder_ids)
        return inputs

    # -- loss and outputs ---------------------------------------------------
    def loss_sum(self, outputs: Any, batch: Batch) -> torch.Tensor:
        return token_cross_entropy_sum(
            outputs.logits, batch["labels"], self.cfg.task.label_smoothing
        )

    def outputs_to_predictions(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        """Nothing from the teacher-forced pass: its loss is all it gives (metrics generate)."""
        return {}

    def generate_predictions(
        self, model: Any, batch: Batch, *, limit: int | None = None
    ) -> dict[str, torch.Tensor]:
        """``generated`` ids ``(batch, returns, tokens)`` and, when labelled, ``reference`` ids.

        Items skipped by ``limit`` get no generated tokens and an all -100
        reference, which ``compute_metrics`` leaves out.
        """
        gen = self.cfg.generate
        keep = (
            torch.ones_like(batch["index"], dtype=torch.bool)
            if limit is None
            else batch["index"] < limit
        )
        inputs = {k: batch[k][keep] for k in ("input_ids", "attention_mask")}
        out: dict[str, torch.Tensor] = {}
        size = (len(keep), gen.num_return_sequences)
        if keep.all():
            out["generated"] = generate_ids(model, inputs, gen, self.tokenizer, decoder_only=False)
        elif keep.any():
            some = generate_ids(model, inputs, gen, self.tokenizer, decoder_only=False)
            out["generated"] = some.new_full((*size, some.shape[-1]), NO_TOKEN)
            out["generated"][keep] = some
        else:
            out["generated"] = batch["input_ids"].new_full((*size, 0), NO_TOKEN)
        if "labels" in batch:
            out["reference"] = batch["labels"].masked_fill(~keep[:, None], NO_TOKEN)
        return out

    def compute_metrics(
        self, predictions: Mapping[str, torch.Tensor], labels: Sequence[str]
    ) -> dict[str, Any]:
        """``bleu`` and ``chrf`` of the best generated sequence per item, when generation ran."""
        if "generated" not in predictions or "reference" not in predictions:
            return {}
        reference = predictions["reference"]
        rows = (reference != IGNORE).any(-1)
        hypotheses = [texts[0] for texts in decode(predictions["generated"][rows], self.tokenizer)]
        references = [texts[0] for texts in decode(reference[rows][:, None], self.tokenizer)]
        return text_metrics(hypotheses, references)

    def format_predictions(
        self,
        predictions: Mapping[str, torch.Tensor],
        labels: Sequence[str],
        records: Sequence[Mapping[str, Any]],
    ) -> list[dict[str, Any]]:
        """``{"generated": text}``; a list, best first, when ``num_return_sequences`` > 1."""
        returns = self.cfg.generate.num_return_sequences
        return generated_rows(predictions["generated"], self.tokenizer, returns)


# -- helpers (module functions: tested directly) ----------------------------------
def target_ids(tokenizer: Any, targets: Sequence[str], max_length: int) -> list[list[int]]:
    """Label ids of ``targets``, at most ``max_length`` each, every one ending in EOS.

    The tokenizer's own special tokens are kept (T5 appends EOS, BART wraps in
    ``<s> ... </s>``); a tokenizer that adds no EOS gets one appended, and a
    cut target gets its last token replaced by EOS, since generation stops
    only once the model emits it.
    """
    eos = tokenizer.eos_token_id
    return [fit_target(row, max_length, eos) for row in full_target_ids(tokenizer, targets)]


def full_target_ids(tokenizer: Any, targets: Sequence[str]) -> list[list[int]]:
    """Label ids of ``targets`` uncut, each ending in EOS (appended if the tokenizer adds none)."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(text_target=list(targets), verbose=False)["input_ids"]
    return [list(row) if eos is None or (row and row[-1] == eos) else [*row, eos] for row in ids]


def fit_target(row: list[int], max_length: int, eos: int | None) -> list[int]:
    """``row`` cut to ``max_length``, its last kept token replaced by ``eos`` when cut."""
    if len(row) <= max_length:
        return row
    return row[:max_length] if eos is None else [*row[: max_length - 1], eos]


def shift_right(labels: torch.Tensor, start: int, pad: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: ``start`` then the labels but the last, -100 as pad."""
    shifted = labels.new_full(labels.shape, pad)
    shifted[:, 0] = start
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE, pad)


def decoder_ids(model: Any, tokenizer: Any, where: str) -> tuple[int, int]:
    """The model's decoder start and pad ids (generation config first, then model config).

    Raises:
        ModelError: The model is not an encoder-decoder or names no decoder start token.
    """
    config = model.config
    if not getattr(config, "is_encoder_decoder", False):
        raise ModelError(
            f"{where}: task.type seq2seq needs an encoder-decoder model (T5, BART, ...), but "
            f"{type(model).__name__} is not one; use a seq2seq checkpoint"
        )
    generation = getattr(model, "generation_config", None)
    start = getattr(generation, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "decoder_start_token_id", None)
    if not isinstance(start, int):
        raise ModelError(
            f"{where}: config.json names no decoder_start_token_id (got {start!r}); set it "
            "(T5: the pad id; BART: the eos id)"
        )
    pad = getattr(config, "pad_token_id", None)
    return start, pad if isinstance(pad, int) else tokenizer.pad_token_id


def text_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu, 0-100) of one hypothesis and one reference per item."""
    import sacrebleu

    if not hypotheses:
        return {}
    return {
        "bleu": float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score),
        "chrf": float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score),
    }
