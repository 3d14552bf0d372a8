"""Online reinforcement fine-tuning of a causal LM: GRPO and RLOO, as TRL 1.16 computes them.

The data set holds prompts. For every window of prompt micro-batches the loop
asks for rollouts (``rollout``): ``rl.group_size`` completions per prompt
sampled with the batched generator, scored by the rewards
(``tasks/rl_rewards.py``), turned into advantages within each group
(``tasks/losses/rl.py``), with the reference's token log-probabilities (for the
KL) and, when a batch of rollouts serves several updates (``rl.iterations``),
the sampling policy's own ("old") ones from a separate forward. The loop then
takes ``rl.iterations`` optimizer steps on those batches.

The reference is the model training starts from, by the preference rules
(``tasks/reference.py``): the base with the adapter off, or a frozen copy; an
SFT adapter folder as the start is merged first, so the reference is the SFT
model, never the pre-SFT base. Dropout is switched off in the policy: the
log-probabilities of the rollouts and of the update must be of the same
function, or the first update's ratio is not 1.

Validation samples one completion per prompt (a fixed seed, so evaluations
compare), and reports its reward, its KL to the reference and its length;
the first ``rl.eval_samples`` prompts, completions and rewards of each
evaluation are kept for the run's ``samples/`` folder and the report.
"""

from __future__ import annotations

import logging
import math
import struct
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from tunesmith.config.task_specs import RLSpec
from tunesmith.errors import TrainingDiverged
from tunesmith.models.dropout import without_dropout
from tunesmith.models.generator import Generator
from tunesmith.tasks.base import Batch, Feature, register_task
from tunesmith.tasks.causal_lm import CausalLM
from tunesmith.tasks.chat_template import resolve_template
from tunesmith.tasks.lm_head import plain_model
from tunesmith.tasks.losses.rl import (
    Clip,
    grpo_advantages,
    grpo_loss_sum,
    grpo_targets,
    grpo_token_loss,
    rloo_advantages,
    rloo_loss_sum,
)
from tunesmith.tasks.preference_data import prompt_feature
from tunesmith.tasks.reference import Reference, reference_for, starting_model
from tunesmith.tasks.rl_data import read_prompt_rows
from tunesmith.tasks.rl_rewards import RewardSet, Scored
from tunesmith.tasks.rl_rollout import (
    RolloutBuffer,
    SamplingSettings,
    completion_rows,
    sample_groups,
)
from tunesmith.tasks.sequence_scores import TokenScores, score_tokens

log = logging.getLogger(__name__)


@dataclass
class RLOutputs:
    """A forward of rollout rows: token log-probabilities (with gradients) and their mask."""

    logps: torch.Tensor
    mask: torch.Tensor


@dataclass
class RLSamples:
    """Validation: one sampled completion per prompt, its rewards, KL and length."""

    reward: torch.Tensor
    kl: torch.Tensor
    length: torch.Tensor
    parts: dict[str, torch.Tensor]


@register_task
class RL(RLSpec, CausalLM):
    """GRPO / RLOO on completions sampled from the policy during training."""

    reference: Reference | None = None
    #: The rewards (set by the run before training: a classifier reward loads a saved run).
    rewards: RewardSet | None = None

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        r = cfg.rl
        self.settings = SamplingSettings(
            r.group_size, r.temperature, r.top_p, r.max_new_tokens, r.stop_at_eos
        )
        self.clip = Clip(r.epsilon, r.upper_epsilon)
        self.iterations = r.iterations
        #: Draws every rollout; saved in checkpoints, so a resumed run samples the same.
        self.rng = torch.Generator().manual_seed(cfg.train.seed)
        self.buffer = RolloutBuffer()
        self._prompts: list[list[int]] = []  # by feature "row"
        self._rows: list[tuple[str, dict[str, Any]]] = []  # prompt text and columns, by row
        self._parts: dict[str, float] = {}
        self._samples: list[dict[str, Any]] = []
        self._generator: Generator | None = None

    # -- data ---------------------------------------------------------------
    def load_records(
        self, path: str, *, labelled: bool = True, dropped: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Prompt rows: the prompt and the columns the rewards read (``tasks/rl_data.py``)."""
        return read_prompt_rows(
            path, self.cfg.data.prompt_column, self.cfg.task.system_prompt, dropped
        )

    def load_splits(self) -> Any:
        """Read and split the prompts (every prompt starting alike stays on one side)."""
        return self.split_free_text("with an empty prompt")

    def encode(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        label2id: Mapping[str, int] | None,
    ) -> list[Feature]:
        """Each prompt through the chat template, ready to be completed; its row noted."""
        limit = self.take_tokenizer(tokenizer, "the chat template's prompts")
        template = resolve_template(tokenizer, self.cfg.task.chat_template)
        features = []
        for record in records:
            feature = prompt_feature(tokenizer, template, record, limit)
            feature["row"] = len(self._prompts)
            self._prompts.append(list(feature["input_ids"]))
            self._rows.append((record.get("text", ""), dict(record.get("columns", {}))))
            features.append(feature)
        return features

    def truncation(self, records: Sequence[Mapping[str, Any]], tokenizer: Any) -> None:
        """Nothing is cut from an answer: the model writes the answers."""
        return None

    def model_inputs(self, batch: Batch) -> Batch:
        return {k: v for k, v in super().model_inputs(batch).items() if k != "row"}

    # -- model --------------------------------------------------------------
    def build_model(self, labels: Sequence[str], tokenizer: Any) -> torch.nn.Module:
        """The starting model without dropout; the reference from it."""
        model = without_dropout(starting_model(self, tokenizer))
        self.reference = reference_for(self.cfg, model)
        return model

    def load_saved(self, path: str, labels: Sequence[str], tokenizer: Any, method: Any) -> Any:
        """A saved run's model; its reference is the configured starting model again."""
        model = without_dropout(super().load_saved(path, labels, tokenizer, method))
        if self.reference is None:
            start = without_dropout(starting_model(self, tokenizer))
            self.reference = reference_for(self.cfg, start, training=False)
        return model

    def before_training(self, model: Any, datasets: Sequence[Any], batch_size: int) -> None:
        """The adapted model without dropout too (LoRA's own dropout comes with the adapter)."""
        without_dropout(model)

    # -- rollouts (called by the loop for every window of prompt batches) -----
    def rollout(self, model: torch.nn.Module, window: Sequence[Batch]) -> list[Batch]:
        """The window's prompts completed, scored and laid out as training batches.

        The batches are also kept (``buffer``) for the window's later updates
        and for a checkpoint written between them.
        """
        policy = plain_model(model)
        started = time.perf_counter()
        rows = [int(r) for batch in window for r in batch["row"].tolist()]
        groups = sample_groups(
            self._generator_for(policy), [self._prompts[r] for r in rows], self.settings, self.rng
        )
        seconds = time.perf_counter() - started
        completions = [c for group in groups for c in group]
        g = self.settings.group_size
        row_of = [r for r in rows for _ in range(g)]
        total, _ = self._score(row_of, completions)
        batches, start = [], 0
        for batch in window:
            n = batch["row"].shape[0] * g
            prompts = [self._prompts[r] for r in row_of[start : start + n]]
            ids = [c.token_ids for c in completions[start : start + n]]
            batches.append(completion_rows(prompts, ids, self.tokenizer.pad_token_id))
            start += n
        old = self._needs_old_logps
        with torch.no_grad():
            for batch in batches:
                if old:
                    batch["old_logps"] = self._score_rows(policy, batch).dense
                if self.reference is not None:
                    batch["ref_logps"] = self._reference_rows(policy, batch)
        advantages = self._advantages(total, batches)
        for batch, adv in zip(
            batches, advantages.split([len(b["input_ids"]) for b in batches]), strict=True
        ):
            batch["advantages"] = adv
        self._note(
            {
                "rollouts": float(len(completions)),
                "reward": float(total.sum()),
                "reward_sq": float((total**2).sum()),
                "generation_s": seconds,
                "generated": float(sum(len(c.token_ids) for c in completions)),
            }
        )
        self.buffer.batches = batches
        return batches

    @property
    def _needs_old_logps(self) -> bool:
        """RLOO always reads them (its KL-in-reward); GRPO when rollouts serve several updates."""
        return self.cfg.rl.algorithm == "rloo" or self.iterations > 1

    def _generator_for(self, policy: torch.nn.Module) -> Generator:
        if self._generator is None or self._generator.model is not policy:
            self._generator = Generator(policy, self.tokenizer)
        return self._generator

    def _score(
        self, rows: Sequence[int], completions: Sequence[Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each completion's total reward and each reward's values."""
        if self.rewards is None:
            raise RuntimeError("rl: no rewards were set up for this run")
        scored = Scored(
            prompts=[self._rows[r][0] for r in rows],
            completions=[c.text for c in completions],
            lengths=[len(c.token_ids) for c in completions],
            columns=[self._rows[r][1] for r in rows],
        )
        return self.rewards(scored)

    def _score_rows(self, model: torch.nn.Module, batch: Batch) -> TokenScores:
        """Token log-probabilities (rows, width - 1) of the completions, at the temperature."""
        return score_tokens(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion"],
            temperature=self.settings.temperature,
        )

    def _reference_rows(self, policy: torch.nn.Module, batch: Batch) -> torch.Tensor:
        assert self.reference is not None
        ref = self.reference.scores(
            policy,
            batch,
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion"],
            temperature=self.settings.temperature,
        )
        return ref.dense  # type: ignore[union-attr]

    def _advantages(self, rewards: torch.Tensor, batches: Sequence[Batch]) -> torch.Tensor:
        """GRPO's group-normalised advantages, or RLOO's (the KL folded into the reward)."""
        r, g = self.cfg.rl, self.settings.group_size
        if r.algorithm == "grpo":
            return grpo_advantages(rewards, g, r.scale_rewards)
        if r.kl_coef != 0.0:
            kl = torch.cat(
                [
                    ((b["old_logps"] - b["ref_logps"]) * b["completion"][:, 1:]).sum(1)
                    for b in batches
                ]
            )
            rewards = rewards - r.kl_coef * kl
        return rloo_advantages(rewards, g, r.normalize_advantages)

    # -- loss ---------------------------------------------------------------
    def scored(self, batch: Batch) -> bool:
        return "advantages" in batch

    def count_targets(self, batch: Batch) -> torch.Tensor:
        """Completion tokens (``loss_type: dapo``) or completions."""
        mask = batch["completion"][:, 1:]
        if self.cfg.rl.algorithm == "rloo":
            return torch.tensor(mask.shape[0], device=mask.device)
        return grpo_targets(mask, self.cfg.rl.loss_type)

    def forward(self, model: torch.nn.Module, batch: Batch) -> Any:
        """Rollout rows: the policy's token log-probabilities; prompts: validation samples."""
        if self.scored(batch):
            scores = self._score_rows(model, batch)
            return RLOutputs(scores.dense, scores.mask)
        if self.rewards is not None and "row" in batch:
            return self._validation_samples(model, batch)
        return None

    def loss_sum(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """The summed clipped policy loss (see ``tasks/losses/rl.py``); statistics noted."""
        r = self.cfg.rl
        logps, mask = outputs.logps, outputs.mask
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old
        adv = batch["advantages"]
        if r.algorithm == "rloo":
            loss, clipped = rloo_loss_sum(logps, old, mask, adv, self.clip)
            clipped_tokens = (clipped[:, None] & mask).sum()
        else:
            token_loss, clipped = grpo_token_loss(
                logps, old, adv, self.clip, batch.get("ref_logps"), r.kl_coef, r.kl_bias_correction
            )
            loss = grpo_loss_sum(token_loss, mask, r.loss_type, r.max_new_tokens)
            clipped_tokens = (clipped & mask).sum()
        tokens = mask.sum()
        values = {"clipped": float(clipped_tokens), "scored_tokens": float(tokens)}
        if "ref_logps" in batch:
            values["update_kl"] = float(((logps.detach() - batch["ref_logps"]) * mask).sum())
            values["update_rows"] = float(mask.shape[0])
        self._guard(values)
        self._note(values)
        return loss

    def _guard(self, values: Mapping[str, float]) -> None:
        """Stop before an update whose KL or clipped share passes its limit (``rl.max_*``)."""
        r = self.cfg.rl
        problems = []
        if r.max_kl is not None and values.get("update_rows"):
            kl = values["update_kl"] / values["update_rows"]
            if kl > r.max_kl:
                problems.append(f"KL to the reference {kl:.3f} passed rl.max_kl {r.max_kl}")
        if r.max_clip_fraction is not None and values["scored_tokens"]:
            share = values["clipped"] / values["scored_tokens"]
            if share > r.max_clip_fraction:
                problems.append(
                    f"clipped share {share:.3f} passed rl.max_clip_fraction {r.max_clip_fraction}"
                )
        if problems:
            raise TrainingDiverged(
                "rl: " + "; ".join(problems) + ": stopped before this update; best/ and the "
                f"resumable checkpoints in {self.cfg.train.output_dir}/checkpoints hold the last "
                "good weights (lower optim.lr, raise rl.beta, or lift the limit and "
                "--resume latest)"
            )

    # -- validation -----------------------------------------------------------
    def _validation_samples(self, model: torch.nn.Module, batch: Batch) -> RLSamples:
        """One completion per prompt, its rewards, KL and length.

        Each prompt is completed alone with a generator seeded by its tokens, so
        an evaluation samples the same whatever the batch, the split's order or
        the process (a reloaded checkpoint reproduces the run's numbers).
        """
        policy = plain_model(model)
        rows = [int(r) for r in batch["row"].tolist()]
        one = replace(self.settings, group_size=1)
        completions = []
        for row in rows:  # a generator per prompt, seeded by its tokens: evaluations draw alike
            key = zlib.crc32(struct.pack(f"{len(self._prompts[row])}q", *self._prompts[row]))
            rng = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + key)
            completions += sample_groups(
                self._generator_for(policy), [self._prompts[row]], one, rng
            )[0]
        total, parts = self._score(rows, completions)
        lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float64)
        kl = torch.zeros(len(rows), dtype=torch.float64)
        if self.reference is not None:
            laid = completion_rows(
                [self._prompts[r] for r in rows],
                [c.token_ids for c in completions],
                self.tokenizer.pad_token_id,
            )
            mask = laid["completion"][:, 1:]
            mine = self._score_rows(policy, laid).dense
            ref = self._reference_rows(policy, laid)
            kl = ((mine - ref) * mask).sum(1).double()
        for row, c, value in zip(rows, completions, total.tolist(), strict=True):
            if len(self._samples) < self.cfg.rl.eval_samples:
                prompt, columns = self._rows[row]
                self._samples.append(
                    {"prompt": prompt, "completion": c.text, "reward": value, **columns}
                )
        return RLSamples(total.double(), kl, lengths, {k: v.double() for k, v in parts.items()})

    def generate_predictions(
        self, model: Any, batch: Batch, *, limit: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Replies for ``predict`` only: validation already sampled and scored its own."""
        if self.rewards is not None:
            return {}
        return super().generate_predictions(model, batch, limit=limit)

    def outputs_to_predictions(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        if not isinstance(outputs, RLSamples):
            return {}
        preds = {"reward": outputs.reward, "kl": outputs.kl, "completion_length": outputs.length}
        return preds | {f"reward/{k}": v for k, v in outputs.parts.items()}

    def compute_metrics(
        self, predictions: Mapping[str, torch.Tensor], labels: Sequence[str]
    ) -> dict[str, Any]:
        """Mean (and spread) of the validation completions' rewards, their KL and length."""
        if "reward" not in predictions:
            return {}
        reward = predictions["reward"]
        metrics = {
            "reward": float(reward.mean()),
            "reward_std": float(reward.std()) if len(reward) > 1 else 0.0,
            "kl": float(predictions["kl"].mean()),
            "completion_length": float(predictions["completion_length"].mean()),
        }
        for key, value in predictions.items():
            if key.startswith("reward/"):
                metrics[key] = float(value.mean())
        return metrics

    # -- the loop's hooks for online tasks ------------------------------------
    def updates_per_window(self) -> int:
        """``rl.iterations`` optimizer steps on every batch of rollouts."""
        return self.iterations

    def window_state(self) -> dict[str, torch.Tensor]:
        """The sampling generator and the current rollouts, for a checkpoint."""
        return {"rng": self.rng.get_state(), **self.buffer.state_tensors()}

    def restore_window_state(self, tensors: Mapping[str, torch.Tensor]) -> list[Batch] | None:
        """Take back ``window_state``; returns the stored rollouts (None: there were none)."""
        if "rng" in tensors:
            self.rng.set_state(tensors["rng"])
        self.buffer.load_state_tensors(dict(tensors))
        return self.buffer.batches

    def evaluation_samples(self) -> list[dict[str, Any]]:
        """The prompts, completions and rewards the last evaluation kept (then forgotten)."""
        samples, self._samples = self._samples, []
        return samples

    # -- training statistics ------------------------------------------------
    def _note(self, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self._parts[name] = self._parts.get(name, 0.0) + value

    def take_parts(self) -> dict[str, float]:
        parts, self._parts = self._parts, {}
        return parts

    def log_fields(self, parts: Mapping[str, float], targets: float) -> dict[str, float]:
        """Reward mean/std, KL, completion length, clipped share, generation speed."""
        out: dict[str, float] = {}
        n = parts.get("rollouts", 0.0)
        if n:
            mean = parts["reward"] / n
            var = max(parts["reward_sq"] / n - mean * mean, 0.0) * n / max(n - 1, 1)
            out |= {
                "reward": mean,
                "reward_std": math.sqrt(var),
                "completion_length": parts["generated"] / n,
                "generation_s": parts["generation_s"],
                "generated_tokens": parts["generated"],
                "generated_tokens_per_s": parts["generated"] / max(parts["generation_s"], 1e-9),
            }
        if parts.get("update_rows"):
            out["kl"] = parts["update_kl"] / parts["update_rows"]
        if parts.get("scored_tokens"):
            out["clip_fraction"] = parts["clipped"] / parts["scored_tokens"]
        return out

    def progress_fields(self, record: Mapping[str, Any]) -> dict[str, str]:
        fields = {}
        if "reward" in record:
            fields["reward"] = f"{record['reward']:.3f}"
        if "kl" in record:
            fields["kl"] = f"{record['kl']:.2f}"
        return fields
