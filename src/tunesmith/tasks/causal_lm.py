"""Causal-LM instruction tuning (SFT): chats rendered with a chat template, replies trained.

Records are chats (``data/chat.py``); each is rendered with the tokenizer's
chat template (or ``task.chat_template``) and tokenised once; labels are the
input ids on the assistant replies (all of them, or the last with
``task.train_on: last_assistant``) and -100 everywhere else
(``tasks/chat_template.py``). The loss is the next-token cross-entropy over
those labels (``task.label_smoothing`` applies); the metric is perplexity,
``exp`` of the mean loss per trained token.

Evaluation measures loss and perplexity only (generating for every
validation chat would dominate the run on a CPU); ``predict`` renders the
prompt with the template's generation prompt and generates a reply with the
``generate`` settings (greedy, sampling or beam search; stops at EOS).

Packing several short chats into one sequence is not implemented: batches
are length-grouped instead, which removes most padding without letting
attention cross from one chat into the next.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.config.task_specs import CausalLMSpec
from tunesmith.data.chat import prompt_record
from tunesmith.data.packing import concat_blocks, pack_documents
from tunesmith.errors import DataError
from tunesmith.tasks.base import Batch, Feature, Task, register_task
from tunesmith.tasks.chat_rows import ChatRows
from tunesmith.tasks.chat_template import (
    check_tools_kept,
    end_of_turn_id,
    label_tokens,
    render,
    reply_spans,
    resolve_template,
)
from tunesmith.tasks.encoding import effective_limit, full_lengths, require_fast_tokenizer
from tunesmith.tasks.generation import generate_ids, generated_rows
from tunesmith.tasks.lm_head import (
    HiddenOutputs,
    forward_to_head,
    labelled_states,
    text_logits,
)
from tunesmith.tasks.losses import IGNORE, shifted_token_cross_entropy_sum
from tunesmith.tasks.losses.linear_ce import linear_cross_entropy_sum, linear_token_losses
from tunesmith.tasks.truncation import TruncationReport, labels_cut

log = logging.getLogger(__name__)


@register_task
class CausalLM(CausalLMSpec, ChatRows, Task):
    """Instruction tuning of a decoder-only model on chats; loss on the replies only."""

    # -- data ---------------------------------------------------------------
    def load_records(
        self, path: str, *, labelled: bool = True, dropped: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Chats (or documents) in the configured layout; KTO rows train their desirable ones."""
        layout, records = self.read_layout(path, labelled=labelled, dropped=dropped)
        if self.cfg.data.packing != "none" and layout != "text":
            raise DataError(
                f"{path}: data.packing {self.cfg.data.packing} packs raw text, but the file holds "
                f"{layout} chats; set data.packing=none (data.padding_free packs chats per batch)"
            )
        if labelled and layout == "kto":
            kept = [r for r in records if r["desirable"]]
            log.info(
                "%s: %d of %d KTO rows are desirable and trained (supervised fine-tuning on KTO "
                "data imitates the good completions only)",
                path,
                len(kept),
                len(records),
            )
            records = kept
        return records

    def text_records(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Each text is one user message (after ``task.system_prompt``); raw text to continue
        when the run trained on raw text (``data.format: text``)."""
        if self.cfg.data.format == "text":
            return [
                {"text": t, "source": f"text {i}", "labelled": False} for i, t in enumerate(texts)
            ]
        return [
            prompt_record(t, f"text {i}", self.cfg.task.system_prompt) for i, t in enumerate(texts)
        ]

    def token_lengths(
        self, records: Sequence[Mapping[str, Any]], tokenizer: Any
    ) -> dict[str, tuple[list[int], int]]:
        """Tokens of each whole chat as the chat template renders it (documents: as they are)."""
        template = (
            resolve_template(tokenizer, self.cfg.task.chat_template)
            if any("messages" in r for r in records)
            else None
        )
        texts = [
            render(tokenizer, r["messages"], template, tools=r.get("tools"))
            if "messages" in r
            else r["text"]
            for r in records
        ]
        lengths = full_lengths(tokenizer, texts, add_special_tokens=False)
        return {"input": (lengths, effective_limit(tokenizer, self.cfg.data.max_length))}

    def encode(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        label2id: Mapping[str, int] | None,
    ) -> list[Feature]:
        """Render and tokenise; training chats get reply labels, prompts keep their end.

        Documents (``data.format: text``) are trained on every token, EOS
        appended, in ``max_length`` pieces (so a long one is never cut short).

        Raises:
            DataError: Chats to train on exist but not one reply token survives
                ``data.max_length`` (nothing would be trained); a row's tool use
                is dropped by the chat template.
        """
        limit = self.take_tokenizer(tokenizer, "character offsets to locate the replies")
        if records and "messages" not in records[0]:
            return document_features(records, tokenizer, limit)
        template = resolve_template(tokenizer, self.cfg.task.chat_template)
        features, empty, labelled = [], 0, 0
        for record in records:
            messages, tools = record["messages"], record.get("tools")
            check_tools_kept(tokenizer, record, template)
            if messages[-1]["role"] != "assistant":  # a prompt to answer: keep its end
                text = render(tokenizer, messages, template, prompt=True, tools=tools)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"][-limit:]
                features.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
                continue
            labelled += 1
            ids, labels = self.labelled_chat(record, tokenizer, template)
            ids, labels = ids[:limit], labels[:limit]
            empty += all(t == IGNORE for t in labels[1:])
            features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
        if labelled and empty == labelled:
            raise DataError(
                f"no reply token to train on: in all {labelled} conversations the assistant "
                f"reply lies beyond data.max_length={limit} tokens (or is empty); raise "
                "data.max_length or shorten the prompts"
            )
        if empty:
            log.warning(
                "%d of %d conversations have no reply token within data.max_length=%d; "
                "they train nothing (raise data.max_length)",
                empty,
                labelled,
                limit,
            )
        return features

    def take_tokenizer(self, tokenizer: Any, why_fast: str) -> int:
        """Keep ``tokenizer`` (it decodes what the model generates); the length limit.

        A fast tokenizer is required (``why_fast`` says what needs it); one
        without a padding token pads with EOS (padding is masked out).
        """
        require_fast_tokenizer(tokenizer, self.name, why_fast)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:  # decoders often have none
            tokenizer.pad_token = tokenizer.eos_token
        return effective_limit(tokenizer, self.cfg.data.max_length)

    def pack_training(self, features: list[Feature], tokenizer: Any) -> list[Feature]:
        """Training documents packed as ``data.packing`` says (chats are left as they are)."""
        packing = self.cfg.data.packing
        if packing == "none" or not features:
            return features
        limit = effective_limit(tokenizer, self.cfg.data.max_length)
        packed = (pack_documents if packing == "documents" else concat_blocks)(features, limit)
        log.info(
            "data.packing %s: %d documents (or pieces) in %d blocks of at most %d tokens",
            packing,
            len(features),
            len(packed),
            limit,
        )
        return packed

    def labelled_chat(
        self, record: Mapping[str, Any], tokenizer: Any, template: str
    ) -> tuple[list[int], list[int]]:
        """A chat's ids and labels, uncut: ``encode`` keeps the first ``limit``, the gate all."""
        last_only = self.cfg.task.train_on == "last_assistant"
        text, spans = reply_spans(
            tokenizer, record["messages"], template, last_only=last_only, tools=record.get("tools")
        )
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return enc["input_ids"], label_tokens(enc["offset_mapping"], enc["input_ids"], spans)

    def truncation(
        self, records: Sequence[Mapping[str, Any]], tokenizer: Any
    ) -> TruncationReport | None:
        """Each chat ending with a reply, measured against ``data.max_length`` uncut.

        Documents (``data.format: text``) are split into pieces, never cut: not gated.
        """
        if records and "messages" not in records[0]:
            return None
        require_fast_tokenizer(tokenizer, self.name, "character offsets to locate the replies")
        template = resolve_template(tokenizer, self.cfg.task.chat_template)
        limit = effective_limit(tokenizer, self.cfg.data.max_length)
        chats = [r for r in records if r["messages"][-1]["role"] == "assistant"]
        first = chats[0]["messages"] if chats else None
        end = end_of_turn_id(tokenizer, first, template) if first else tokenizer.eos_token_id
        name = None if end is None else tokenizer.convert_ids_to_tokens(end)
        report = TruncationReport("data.max_length", limit, name)
        for record in chats:
            ids, labels = self.labelled_chat(record, tokenizer, template)
            report.rows.append(labels_cut(record["source"], labels, limit, end, tokens=len(ids)))
        return report

    # -- model --------------------------------------------------------------
    def auto_class(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def build_model(self, labels: Sequence[str], tokenizer: Any) -> torch.nn.Module:
        model = self.load_configured()
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    def model_inputs(self, batch: Batch) -> Batch:
        """No key/value cache while training or scoring: it only costs memory."""
        return {**super().model_inputs(batch), "use_cache": False}

    # -- loss and outputs ---------------------------------------------------
    def count_targets(self, batch: Batch) -> torch.Tensor:
        """Tokens that are predicted: labelled ones after the first position."""
        return (batch["labels"][:, 1:] != IGNORE).sum()

    def forward(self, model: torch.nn.Module, batch: Batch) -> Any:
        """Scored batches stop before the LM head (``task.head_in_loss``): the loss applies it."""
        if "labels" in batch and self.cfg.task.head_in_loss:
            outputs = forward_to_head(model, self.model_inputs(batch))
            if outputs is not None:
                return outputs
        return super().forward(model, batch)

    def loss_sum(self, outputs: Any, batch: Batch) -> torch.Tensor:
        eps = self.cfg.task.label_smoothing
        if isinstance(outputs, HiddenOutputs):
            hidden, targets = labelled_states(outputs.hidden, batch["labels"])
            head = outputs.head
            return linear_cross_entropy_sum(hidden, head.weight, head.bias, targets, eps)
        return shifted_token_cross_entropy_sum(
            text_logits(outputs, batch["labels"]), batch["labels"], eps
        )

    def outputs_to_predictions(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        """Per chat: summed negative log-likelihood of its reply tokens, and their number."""
        if "labels" not in batch:
            return {}
        labels = batch["labels"][:, 1:]
        targets = (labels != IGNORE).sum(1)
        if isinstance(outputs, HiddenOutputs):
            hidden, wanted = labelled_states(outputs.hidden, batch["labels"])
            head = outputs.head
            nll = linear_token_losses(hidden, head.weight, head.bias, wanted)
            rows = (labels != IGNORE).nonzero()[:, 0]
            per_row = torch.zeros(labels.shape[0], dtype=torch.float64, device=nll.device)
            return {"nll_sum": per_row.index_add_(0, rows, nll.double()), "targets": targets}
        nll = F.cross_entropy(
            text_logits(outputs, batch["labels"])[:, :-1].float().transpose(1, 2),
            labels,
            ignore_index=IGNORE,
            reduction="none",
        )
        return {"nll_sum": nll.sum(1).double(), "targets": targets}

    def compute_metrics(
        self, predictions: Mapping[str, torch.Tensor], labels: Sequence[str]
    ) -> dict[str, Any]:
        """Perplexity over every trained token of the split (not a mean of per-chat ones)."""
        if "nll_sum" not in predictions:
            return {}
        tokens = int(predictions["targets"].sum())
        mean = float(predictions["nll_sum"].sum()) / max(tokens, 1)
        return {"perplexity": math.exp(min(mean, 700.0)), "trained_tokens": tokens}

    def generate_predictions(
        self, model: Any, batch: Batch, *, limit: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Replies to prompt batches (chats ending with a user turn); none for scored chats."""
        if "labels" in batch:
            return {}
        inputs = left_aligned(batch["input_ids"], batch["attention_mask"], self.tokenizer)
        ids = generate_ids(model, inputs, self.cfg.generate, self.tokenizer, decoder_only=True)
        return {"generated": ids}

    def format_predictions(
        self,
        predictions: Mapping[str, torch.Tensor],
        labels: Sequence[str],
        records: Sequence[Mapping[str, Any]],
    ) -> list[dict[str, Any]]:
        if "generated" not in predictions:
            return [{} for _ in records]
        returns = self.cfg.generate.num_return_sequences
        return generated_rows(predictions["generated"], self.tokenizer, returns)


def document_features(
    records: Sequence[Mapping[str, Any]], tokenizer: Any, limit: int
) -> list[Feature]:
    """Raw-text features: every token trained, EOS closing each document, ``limit``-token pieces.

    Prediction input (``labelled: False``) is a text to continue: it keeps its
    end and gets no EOS.
    """
    eos = tokenizer.eos_token_id
    features: list[Feature] = []
    for record in records:
        ids = tokenizer(record["text"])["input_ids"]
        if not record.get("labelled", True):
            ids = ids[-limit:]
            features.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
            continue
        ids = [*ids, eos] if eos is not None and (not ids or ids[-1] != eos) else ids
        for start in range(0, len(ids), limit):
            piece = ids[start : start + limit]
            features.append(
                {"input_ids": piece, "attention_mask": [1] * len(piece), "labels": list(piece)}
            )
    return features


def left_aligned(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer: Any
) -> dict[str, torch.Tensor]:
    """The same prompts padded on the left, so every one ends where generation starts."""
    ids = torch.full_like(input_ids, tokenizer.pad_token_id)
    mask = torch.zeros_like(attention_mask)
    width = input_ids.shape[1]
    for i in range(input_ids.shape[0]):
        real = input_ids[i][attention_mask[i].bool()]
        ids[i, width - len(real) :] = real
        mask[i, width - len(real) :] = 1
    return {"input_ids": ids, "attention_mask": mask}
