"""Preference optimisation of a causal LM: DPO and its relatives, ORPO, SimPO and KTO.

Rows are pairs (prompt, chosen, rejected) or, for KTO, unpaired rows
(prompt, completion, desirable), through the chat template
(``tasks/preference_data.py``). A batch of pairs goes through the model as one
forward of its chosen rows followed by its rejected rows (as TRL does); only
reply tokens are scored (``tasks/sequence_scores.py``) and the losses
(``tasks/losses/preference.py``) compare each reply's log-probability with the
reference's. The loop divides the summed per-pair losses by the pairs of the
accumulation window.

The reference is the model training starts from (``tasks/reference.py``):
the base with the adapter switched off under peft methods, else a frozen
copy, or log-probabilities computed once before training
(``preference.precompute_reference``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.config.preference import LOSSES
from tunesmith.config.task_specs import PreferenceSpec
from tunesmith.errors import DataError
from tunesmith.tasks.base import Batch, Feature, register_task
from tunesmith.tasks.causal_lm import CausalLM
from tunesmith.tasks.chat_template import resolve_template
from tunesmith.tasks.losses.preference import (
    PAIR_LOSSES,
    LossParams,
    PairScores,
    kto,
    kto_kl,
    pair_rewards,
)
from tunesmith.tasks.preference_batch import kto_batch, mismatched_batch, stack_pairs
from tunesmith.tasks.preference_data import (
    Dropped,
    kto_feature,
    mismatched_rows,
    pair_feature,
    prompt_feature,
)
from tunesmith.tasks.reference import Reference, reference_for, starting_model
from tunesmith.tasks.sequence_scores import TokenScores, score_tokens, token_kl

log = logging.getLogger(__name__)

#: Training statistics summed per pair (or KTO row) and logged as window means.
TRAIN_PARTS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracy",
    "rewards/margin",
    "logps/chosen",
    "logps/rejected",
    "logps/ref_chosen",
    "logps/ref_rejected",
)


@dataclass
class PreferenceOutputs:
    """What one forward of a batch gives the loss and the metrics."""

    pairs: PairScores | None = None
    #: KTO: each row's policy and reference log-probability, and the batch's KL estimate.
    rows: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None
    #: Validation only: summed token KL(policy || reference) over each chosen reply.
    kl: torch.Tensor | None = None


@register_task
class Preference(PreferenceSpec, CausalLM):
    """Preference optimisation of a decoder-only model; scores replies against a reference."""

    reference: Reference | None = None

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        p, eps = cfg.preference, cfg.task.label_smoothing
        good, bad = p.weights
        self.params = LossParams(p.beta, eps, p.gamma, good, bad)
        self._parts: dict[str, float] = {}

    # -- data ---------------------------------------------------------------
    def load_records(
        self, path: str, *, labelled: bool = True, dropped: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Pairs, or KTO rows for ``preference.loss: kto``; prompts alone when unlabelled."""
        wanted = "kto" if self.cfg.preference.loss == "kto" else "preference"
        fmt = wanted if labelled and self.cfg.data.format == "auto" else None
        layout, records = self.read_layout(path, labelled=labelled, dropped=dropped, fmt=fmt)
        if labelled and layout != wanted:
            raise DataError(
                f"{path}: preference.loss {self.cfg.preference.loss} trains on {wanted} rows "
                f"but the file holds {layout} rows (set data.format or the columns: "
                + ("prompt, completion, label)" if wanted == "kto" else "prompt, chosen, rejected)")
            )
        return records

    def encode(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        label2id: Mapping[str, int] | None,
    ) -> list[Feature]:
        """Pairs (or KTO rows) as features; rows that cannot train are dropped and counted.

        Raises:
            DataError: Rows to train on exist but none survives (each reason counted).
        """
        limit = self.take_tokenizer(tokenizer, "the chat template's reply tokens")
        template = resolve_template(tokenizer, self.cfg.task.chat_template)
        dropped = Dropped()
        features: list[Feature] = []
        labelled = 0
        for record in records:
            if "chosen" in record or "completion" in record:
                labelled += 1
                make = pair_feature if "chosen" in record else kto_feature
                feature = make(tokenizer, template, record, limit, dropped)
                if feature is not None:
                    features.append(feature)
            else:
                features.append(prompt_feature(tokenizer, template, record, limit))
        for line in dropped.lines():
            log.warning("%s", line)
        if labelled and not features:
            raise DataError(
                f"no usable preference row: all {labelled} rows were dropped ("
                + "; ".join(dropped.lines())
                + ")"
            )
        if features and "desirable" in features[0]:
            mismatched_rows(features, self.cfg.train.batch_size)
        return features

    def truncation(self, records: Sequence[Mapping[str, Any]], tokenizer: Any) -> None:
        """Before the model loads: refuse data in which no pair can train (``encode`` says why)."""
        self.encode(records, tokenizer, None)
        return None

    def feature_length(self, feature: Feature) -> int:
        """The longer sequence of the pair: what the batch is padded to."""
        return max(len(feature["input_ids"]), len(feature.get("rejected_input_ids", ())))

    # -- model --------------------------------------------------------------
    def build_model(self, labels: Sequence[str], tokenizer: Any) -> torch.nn.Module:
        """The starting model (an SFT adapter merged into its base); the reference from it."""
        model = starting_model(self, tokenizer)
        self.reference = reference_for(self.cfg, model)
        return model

    def load_saved(self, path: str, labels: Sequence[str], tokenizer: Any, method: Any) -> Any:
        """A saved run's model; its reference is the configured starting model again.

        Adapter runs rebuild the starting model under the adapter (switched off,
        it is the reference); fully trained folders get a frozen starting model.
        """
        model = super().load_saved(path, labels, tokenizer, method)
        if self.reference is None or self.reference.kind == "pending":
            self.reference = reference_for(
                self.cfg, starting_model(self, tokenizer), training=False
            )
        return model

    def before_training(self, model: Any, datasets: Sequence[Any], batch_size: int) -> None:
        """``preference.precompute_reference``: score every row once, then drop the reference."""
        if self.reference is not None:
            self.reference = self.reference.precompute(model, datasets, self, batch_size)

    # -- loss and outputs ---------------------------------------------------
    def scored(self, batch: Batch) -> bool:
        return "prompt_length" in batch

    def count_targets(self, batch: Batch) -> torch.Tensor:
        """Pairs (or KTO rows): each contributes one loss."""
        return torch.tensor(batch["prompt_length"].shape[0], device=batch["input_ids"].device)

    def forward(self, model: torch.nn.Module, batch: Batch) -> Any:
        """Score the replies (and the reference's) in one forward; prompts are generated for."""
        if not self.scored(batch):
            return super().forward(model, batch)
        if "rejected_input_ids" in batch:
            return self._pairs_forward(model, batch)
        return self._kto_forward(model, batch)

    def _pairs_forward(self, model: torch.nn.Module, batch: Batch) -> PreferenceOutputs:
        ids, mask, replies = stack_pairs(batch, self.tokenizer.pad_token_id)
        n = batch["input_ids"].shape[0]
        orpo = self.cfg.preference.loss == "orpo"
        # ORPO's NLL reads every chosen token, prompt included (as TRL computes it).
        scored = replies | (mask.bool() & _first_rows(mask, n)) if orpo else replies
        eval_kl = not model.training and self.reference is not None
        policy = score_tokens(model, ids, mask, scored, keep_log_probs=eval_kl)
        reply = replies[:, 1:]
        sums, counts = policy.sums(reply), policy.counts(reply).float()
        pairs = PairScores(sums[:n], sums[n:], chosen_tokens=counts[:n], rejected_tokens=counts[n:])
        if orpo:
            nll = -policy.dense[:n][policy.mask[:n]]
            pairs.chosen_nll = nll.mean()
        kl = None
        if self.reference is not None:
            ref = self.reference.scores(model, batch, ids, mask, replies, keep_log_probs=eval_kl)
            if isinstance(ref, TokenScores):
                ref_sums = ref.sums(reply)
                pairs.ref_chosen, pairs.ref_rejected = ref_sums[:n], ref_sums[n:]
                if eval_kl and ref.log_probs is not None and policy.log_probs is not None:
                    kl = _reply_kl(policy, ref, n)
            else:
                pairs.ref_chosen, pairs.ref_rejected = ref
        return PreferenceOutputs(pairs=pairs, kl=kl)

    def _kto_forward(self, model: torch.nn.Module, batch: Batch) -> PreferenceOutputs:
        pad = self.tokenizer.pad_token_id
        ids, mask, replies = kto_batch(batch, pad)
        logps = score_tokens(model, ids, mask, replies).sums()
        kl_ids, kl_mask, kl_replies = mismatched_batch(batch, pad)
        with torch.no_grad():
            kl_logps = score_tokens(model, kl_ids, kl_mask, kl_replies).sums()
        ref = self.reference.scores(model, batch, ids, mask, replies) if self.reference else None
        ref_kl = (
            self.reference.scores(model, batch, kl_ids, kl_mask, kl_replies, kl=True)
            if self.reference
            else None
        )
        ref_logps = ref.sums() if isinstance(ref, TokenScores) else ref
        ref_kl_logps = ref_kl.sums() if isinstance(ref_kl, TokenScores) else ref_kl
        if ref_logps is None or ref_kl_logps is None:
            raise ValueError("kto needs a reference")
        return PreferenceOutputs(rows=(logps, ref_logps, kto_kl(kl_logps, ref_kl_logps)))

    def loss_sum(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """Summed per-pair (or per-row) losses; training statistics are noted for the log."""
        if outputs.rows is not None:
            logps, ref_logps, kl = outputs.rows
            desirable = batch["desirable"].bool()
            losses = kto(logps, ref_logps, desirable, kl, self.params)
            self._note_kto(logps, ref_logps, desirable, kl)
            return losses.sum()
        losses = PAIR_LOSSES[self.cfg.preference.loss](outputs.pairs, self.params)
        self._note_pairs(outputs.pairs)
        return losses.sum()

    def outputs_to_predictions(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        """Per pair: both rewards and log-probabilities, and the KL to the reference."""
        if not self.scored(batch) or not isinstance(outputs, PreferenceOutputs):
            return {}
        if outputs.rows is not None:
            logps, ref_logps, _ = outputs.rows
            reward = self.params.beta * (logps - ref_logps)
            return {"reward": reward.detach().double(), "desirable": batch["desirable"]}
        chosen, rejected = pair_rewards(outputs.pairs, self.cfg.preference.loss, self.params.beta)
        preds = {"chosen_reward": chosen.double(), "rejected_reward": rejected.double()}
        if outputs.kl is not None:
            preds["kl"] = outputs.kl.double()
        return preds

    def compute_metrics(
        self, predictions: Mapping[str, torch.Tensor], labels: Sequence[str]
    ) -> dict[str, Any]:
        """Reward accuracy and margin over the split's pairs; the mean KL per chosen reply.

        KTO rows have no pairs: accuracy is how often a desirable row's reward
        exceeds 0 and an undesirable one's falls below it.
        """
        if "reward" in predictions:
            reward, good = predictions["reward"], predictions["desirable"].bool()
            right = torch.where(good, reward > 0, reward < 0).double()
            return {
                "reward_accuracy": float(right.mean()),
                "reward_margin": float(reward[good].mean() - reward[~good].mean())
                if good.any() and (~good).any()
                else 0.0,
            }
        if "chosen_reward" not in predictions:
            return {}
        chosen, rejected = predictions["chosen_reward"], predictions["rejected_reward"]
        metrics = {
            "reward_accuracy": float((chosen > rejected).double().mean()),
            "reward_margin": float((chosen - rejected).mean()),
            "rewards/chosen": float(chosen.mean()),
            "rewards/rejected": float(rejected.mean()),
        }
        if "kl" in predictions:
            metrics["kl"] = float(predictions["kl"].mean())
        return metrics

    # -- training statistics ------------------------------------------------
    def _note(self, values: Mapping[str, torch.Tensor]) -> None:
        for name, value in values.items():
            self._parts[name] = self._parts.get(name, 0.0) + float(value.detach().sum())

    def _note_pairs(self, s: PairScores) -> None:
        chosen, rejected = pair_rewards(s, self.cfg.preference.loss, self.params.beta)
        values = {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/accuracy": (chosen > rejected).float(),
            "rewards/margin": chosen - rejected,
            "logps/chosen": s.chosen,
            "logps/rejected": s.rejected,
        }
        if s.ref_chosen is not None and s.ref_rejected is not None:
            values |= {"logps/ref_chosen": s.ref_chosen, "logps/ref_rejected": s.ref_rejected}
        self._note(values)

    def _note_kto(
        self, logps: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor
    ) -> None:
        reward = self.params.beta * (logps - ref)
        right = torch.where(desirable, reward > 0, reward < 0).float()
        self._note({"rewards/accuracy": right, "logps/chosen": logps, "logps/ref_chosen": ref})
        self._parts["kl"] = self._parts.get("kl", 0.0) + float(kl) * len(logps)

    def take_parts(self) -> dict[str, float]:
        parts, self._parts = self._parts, {}
        return parts

    def log_fields(self, parts: Mapping[str, float], targets: float) -> dict[str, float]:
        """Window means per pair of the noted statistics."""
        names = (*TRAIN_PARTS, "kl")
        return {n: parts[n] / max(targets, 1.0) for n in names if n in parts}

    def progress_fields(self, record: Mapping[str, Any]) -> dict[str, str]:
        if "rewards/accuracy" not in record:
            return {}
        return {"acc": f"{record['rewards/accuracy']:.2f}"}


def _first_rows(mask: torch.Tensor, n: int) -> torch.Tensor:
    """(rows, width) bool: True on the first ``n`` rows."""
    rows = torch.arange(mask.shape[0], device=mask.device)
    return (rows < n)[:, None].expand_as(mask)


def _reply_kl(policy: TokenScores, ref: TokenScores, n: int) -> torch.Tensor:
    """Summed token KL over each chosen reply (both tables hold the same scored positions)."""
    assert policy.log_probs is not None and ref.log_probs is not None
    per_token = token_kl(policy.log_probs, ref.log_probs)
    dense = torch.zeros(policy.mask.shape, dtype=per_token.dtype, device=per_token.device)
    dense = dense.masked_scatter(policy.mask, per_token)
    return dense[:n].sum(1)


__all__ = ["LOSSES", "Preference"]
