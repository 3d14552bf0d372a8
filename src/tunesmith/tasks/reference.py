"""The reference a preference run compares its policy with: the model training starts from.

Three ways to have it, chosen from the method and ``preference``:

* **adapter off** (peft methods: LoRA, DoRA, IA3, prefix, prompt): the policy
  with its adapter switched off *is* the starting model, so no second copy;
* **frozen copy** (full, freeze/top-N, bottleneck): a copy of the starting
  model taken before the method changes it, in eval mode, never trained;
* **precomputed** (``preference.precompute_reference``): every row's reference
  log-probabilities computed once before training (with the adapter off or on
  the untrained model) and carried in the features; nothing is kept in memory.

A run may start from an SFT checkpoint that is itself an adapter (the usual
pipeline). That adapter is merged into its base on loading (``load_configured``),
so "adapter off" gives the SFT model, never the pre-SFT base.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch

from tunesmith.config.specs import METHOD_SPECS
from tunesmith.data.batching import Collator
from tunesmith.tasks.lm_head import plain_model
from tunesmith.tasks.preference_batch import kto_batch, mismatched_batch, stack_pairs
from tunesmith.tasks.sequence_scores import TokenScores, score_tokens

log = logging.getLogger(__name__)

#: Feature keys of precomputed reference log-probabilities.
PAIR_KEYS = ("ref_chosen", "ref_rejected")
KTO_KEYS = ("ref_logps", "ref_kl_logps")


def starting_model(task: Any, tokenizer: Any) -> torch.nn.Module:
    """The configured model (an adapter folder comes merged into its base: ``load_configured``)."""
    model = task.load_configured()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


class Reference:
    """Reference log-probabilities for a batch (see the module docstring for the kinds).

    Args:
        kind: ``adapter_off``, ``copy`` or ``precomputed`` (``pending`` until
            ``precompute`` ran).
        model: The frozen copy (kind ``copy``).
    """

    def __init__(self, kind: str, model: torch.nn.Module | None = None) -> None:
        self.kind = kind
        self.model = model

    def scores(
        self,
        policy: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        ids: torch.Tensor,
        mask: torch.Tensor,
        scored: torch.Tensor,
        *,
        keep_log_probs: bool = False,
        kl: bool = False,
        temperature: float = 1.0,
    ) -> TokenScores | torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The reference's token scores of ``ids``; precomputed: the stored sums.

        ``kl`` picks KTO's mismatched rows' stored sums; ``temperature`` divides
        the logits first (RL rollouts).
        """
        if self.kind == "precomputed":
            if "ref_chosen" in batch:
                return batch["ref_chosen"], batch["ref_rejected"]
            return batch["ref_kl_logps" if kl else "ref_logps"]
        with torch.no_grad():
            if self.kind == "copy":
                assert self.model is not None
                self.model.to(ids.device)
                return score_tokens(
                    self.model,
                    ids,
                    mask,
                    scored,
                    keep_log_probs=keep_log_probs,
                    temperature=temperature,
                )
            with plain_model(policy).disable_adapter():
                return score_tokens(
                    policy,
                    ids,
                    mask,
                    scored,
                    keep_log_probs=keep_log_probs,
                    temperature=temperature,
                )

    def precompute(
        self, policy: torch.nn.Module, datasets: Sequence[Any], task: Any, batch_size: int
    ) -> Reference:
        """Store every scored row's reference sums in its features; returns the new reference."""
        if self.kind != "pending":
            return self
        live = Reference("adapter_off" if _is_peft(policy) else "copy", None)
        if live.kind == "copy":
            live.model = policy  # untrained yet: the starting model itself
        was_training = policy.training
        policy.eval()
        collator = Collator(task.tokenizer.pad_token_id, "right")
        rows = 0
        for dataset in datasets:
            features = [f for f in dataset.features if "prompt_length" in f]
            for start in range(0, len(features), batch_size):
                chunk = features[start : start + batch_size]
                batch = collator(chunk)
                for key, values in _reference_sums(task, live, policy, batch).items():
                    for feature, value in zip(chunk, values.tolist(), strict=True):
                        feature[key] = value
                rows += len(chunk)
        policy.train(was_training)
        log.info("reference log-probabilities precomputed for %d rows; no reference kept", rows)
        return Reference("precomputed")


def _reference_sums(
    task: Any, live: Reference, policy: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The stored reference sums of one collated batch of features."""
    pad = task.tokenizer.pad_token_id
    if "rejected_input_ids" in batch:
        ids, mask, replies = stack_pairs(batch, pad)
        sums = live.scores(policy, batch, ids, mask, replies).sums(replies[:, 1:])
        n = batch["input_ids"].shape[0]
        return {PAIR_KEYS[0]: sums[:n], PAIR_KEYS[1]: sums[n:]}
    ids, mask, replies = kto_batch(batch, pad)
    own = live.scores(policy, batch, ids, mask, replies)
    kl_ids, kl_mask, kl_replies = mismatched_batch(batch, pad)
    other = live.scores(policy, batch, kl_ids, kl_mask, kl_replies)
    return {KTO_KEYS[0]: own.sums(), KTO_KEYS[1]: other.sums()}


def _is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(plain_model(model), PeftModel)


def reference_for(cfg: Any, model: torch.nn.Module, *, training: bool = True) -> Reference | None:
    """The run's reference, decided before the method adapts ``model`` (the starting model).

    None for reference-free losses (ORPO, SimPO). ``training`` False (a saved
    run evaluated later) never precomputes: the rows scored are new.
    """
    p = cfg.preference
    if not p.needs_reference:
        return None
    if p.precompute_reference and training:
        return Reference("pending")
    if METHOD_SPECS.get(cfg.method.name).peft_adapter:
        return Reference("adapter_off")
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    log.info("reference: a frozen copy of the starting model (precompute_reference drops it)")
    return Reference("copy", frozen)
