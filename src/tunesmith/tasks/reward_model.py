"""Reward models: a scalar head trained so that chosen replies out-score rejected ones.

Rows are preference pairs (``prompt``, ``chosen``, ``rejected``, optional
``margin``). Each side is one text: rendered through the chat template where
the tokenizer has one (or ``task.chat_template`` is set), else the prompt and
the reply as a text pair (encoders). Both sides of a batch go through the model
in one forward; the loss is Bradley-Terry's, ``-log sigma(r_chosen - r_rejected
- margin)`` per pair (TRL's ``RewardTrainer``). The model is a plain
one-label ``AutoModelForSequenceClassification``: its own forward picks the
scored position (a decoder's last token that is not padding, as transformers
does when the folder is loaded elsewhere), so scores agree with plain
transformers by construction. ``predict`` returns each text's ``score``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.config.task_specs import RewardModelSpec
from tunesmith.data.formats.preference import MARGIN
from tunesmith.errors import DataError
from tunesmith.tasks.base import Batch, Feature, Task, register_task
from tunesmith.tasks.chat_rows import ChatRows
from tunesmith.tasks.chat_template import render, resolve_template
from tunesmith.tasks.encoding import effective_limit
from tunesmith.tasks.preference_batch import real_rows, right_padded

#: Columns of a prompt/response file scored by ``predict``.
RESPONSE = "response"


@register_task
class RewardModel(RewardModelSpec, ChatRows, Task):
    """A one-label scalar head on an encoder or decoder; Bradley-Terry loss on pairs."""

    pad_id: int = 0

    # -- data ---------------------------------------------------------------
    def load_records(
        self, path: str, *, labelled: bool = True, dropped: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Pairs to train on; unlabelled files are prompt/response rows (or texts) to score."""
        fmt = "preference" if labelled and self.cfg.data.format == "auto" else None
        layout, records = self.read_layout(path, labelled=labelled, dropped=dropped, fmt=fmt)
        if labelled and layout != "preference":
            raise DataError(
                f"{path}: a reward model trains on preference rows (prompt, chosen, rejected), "
                f"but the file holds {layout} rows"
            )
        return records

    def text_records(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Texts scored exactly as given (render chats with the template first)."""
        return [{"text": t, "source": f"text {i}"} for i, t in enumerate(texts)]

    def encode(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        label2id: Mapping[str, int] | None,
    ) -> list[Feature]:
        """Both sides of each pair as token ids; texts and prompt/response rows to score."""
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = tokenizer.pad_token_id  # pads the joined chosen + rejected batch
        limit = effective_limit(tokenizer, self.cfg.data.max_length)
        chat = bool(self.cfg.task.chat_template or getattr(tokenizer, "chat_template", None))
        template = resolve_template(tokenizer, self.cfg.task.chat_template) if chat else None
        features: list[Feature] = []
        for record in records:
            if "chosen" not in record:
                ids = self._ids(tokenizer, template, record, None, limit)
                features.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
                continue
            chosen = self._ids(tokenizer, template, record, record["chosen"], limit)
            rejected = self._ids(tokenizer, template, record, record["rejected"], limit)
            feature: Feature = {
                "input_ids": chosen,
                "attention_mask": [1] * len(chosen),
                "rejected_input_ids": rejected,
                "rejected_attention_mask": [1] * len(rejected),
                MARGIN: float(record.get(MARGIN, 0.0)),
            }
            features.append(feature)
        return features

    @staticmethod
    def _ids(
        tokenizer: Any,
        template: str | None,
        record: Mapping[str, Any],
        reply: list[dict[str, Any]] | None,
        limit: int,
    ) -> list[int]:
        """One side's ids: the chat rendered, or prompt and reply as a text pair."""
        if "text" in record and reply is None:
            return tokenizer(record["text"], truncation=True, max_length=limit)["input_ids"]
        messages = record["messages"] if reply is None else [*record["prompt"], *reply]
        if template is not None:
            text = render(tokenizer, messages, template)
            return tokenizer(text, add_special_tokens=False)["input_ids"][:limit]
        prompt = "\n".join(m["content"] for m in messages if m["role"] != "assistant")
        answer = "\n".join(m["content"] for m in messages if m["role"] == "assistant")
        return tokenizer(prompt, answer or None, truncation=True, max_length=limit)["input_ids"]

    def feature_length(self, feature: Feature) -> int:
        return max(len(feature["input_ids"]), len(feature.get("rejected_input_ids", ())))

    # -- model --------------------------------------------------------------
    def auto_class(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def build_model(self, labels: Sequence[str], tokenizer: Any) -> torch.nn.Module:
        """The configured model with a new one-label head; padding known to its pooling."""
        model = self.load_with_head(["reward"])
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    # -- loss and outputs ---------------------------------------------------
    def scored(self, batch: Batch) -> bool:
        return "rejected_input_ids" in batch

    def count_targets(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["input_ids"].shape[0], device=batch["input_ids"].device)

    def model_inputs(self, batch: Batch) -> Batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, model: torch.nn.Module, batch: Batch) -> Any:
        """Rewards of every row; a pair's two sides in one forward (chosen rows first)."""
        if not self.scored(batch):
            return model(**self.model_inputs(batch)).logits[:, 0]
        rows = real_rows(batch["input_ids"], batch["attention_mask"])
        rows += real_rows(batch["rejected_input_ids"], batch["rejected_attention_mask"])
        ids, mask, _ = right_padded(rows, self.pad_id, torch.zeros(len(rows), dtype=torch.long))
        return model(input_ids=ids, attention_mask=mask).logits[:, 0]

    def loss_sum(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """Bradley-Terry: -log sigma(chosen - rejected - margin), summed over the pairs."""
        n = batch["input_ids"].shape[0]
        chosen, rejected = outputs[:n].float(), outputs[n:].float()
        margin = batch.get(MARGIN, torch.zeros_like(chosen)).to(chosen)
        return -F.logsigmoid(chosen - rejected - margin).sum()

    def outputs_to_predictions(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        if not self.scored(batch):
            return {"score": outputs.detach().double()}
        n = batch["input_ids"].shape[0]
        return {"chosen": outputs[:n].detach().double(), "rejected": outputs[n:].detach().double()}

    def compute_metrics(
        self, predictions: Mapping[str, torch.Tensor], labels: Sequence[str]
    ) -> dict[str, Any]:
        """How often the chosen reply scores higher, and the mean score gap."""
        if "chosen" not in predictions:
            return {}
        gap = predictions["chosen"] - predictions["rejected"]
        return {"pairwise_accuracy": float((gap > 0).double().mean()), "margin": float(gap.mean())}

    def format_predictions(
        self,
        predictions: Mapping[str, torch.Tensor],
        labels: Sequence[str],
        records: Sequence[Mapping[str, Any]],
    ) -> list[dict[str, Any]]:
        if "score" not in predictions:
            return [{} for _ in records]
        return [{"score": round(float(s), 6)} for s in predictions["score"]]
