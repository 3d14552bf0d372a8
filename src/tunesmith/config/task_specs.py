"""The built-in tasks as config validation sees them (torch-free; see ``specs``).

Each spec holds a task's name, metrics, capability flags and its config
checks; the task itself (``tasks/<name>.py``) inherits from it.
"""

from __future__ import annotations

from typing import Any

from tunesmith.config.heads import METRICS_BY_PROBLEM, REGRESSION_LOWER, head_problems
from tunesmith.config.multitask import MULTITASK, sub_config
from tunesmith.config.specs import (
    METHOD_SPECS,
    TASK_SPECS,
    Problem,
    TaskSpec,
    all_method_specs,
    register_task_spec,
)


@register_task_spec
class SequenceClassificationSpec(TaskSpec):
    """One label per text (or text pair) with a linear head on the pooled encoder."""

    name = "sequence_classification"
    metric_names = METRICS_BY_PROBLEM["single_label"]  # the task sets its problem type's
    lower_better_metrics = REGRESSION_LOWER
    problem_types = tuple(METRICS_BY_PROBLEM)
    has_classes = True
    word_augment = True
    row_labels = True
    multitask_head = True
    onnx_export = True

    @classmethod
    def default_metric(cls, cfg: Any) -> str:
        """The problem type's headline metric: accuracy, micro_f1 or rmse."""
        return METRICS_BY_PROBLEM[cfg.task.problem_type][0]

    @classmethod
    def default_loss(cls, cfg: Any) -> str:
        """Regression defaults to mean squared error, the classifiers to cross-entropy."""
        return "mse" if cfg.task.problem_type == "regression" else "cross_entropy"

    @classmethod
    def check_config(cls, cfg: Any) -> list[Problem]:
        """Loss, label and distillation keys the problem type cannot use (``config/heads``)."""
        return head_problems(cfg)


@register_task_spec
class TokenClassificationSpec(TaskSpec):
    """A tag per word (NER, BIO/IOBES) with a linear head on every token."""

    name = "token_classification"
    metric_names = ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")
    peft_task_type = "TOKEN_CLS"
    has_classes = True
    word_augment = True  # EDA keeps one tag per word; back-translation cannot (row_labels)
    multitask_head = True
    onnx_export = True


@register_task_spec
class CausalLMSpec(TaskSpec):
    """Instruction tuning of a decoder-only model on chats; loss on the replies only."""

    name = "causal_lm"
    metric_names = ("perplexity",)
    lower_better_metrics = frozenset({"perplexity"})
    peft_task_type = "CAUSAL_LM"
    new_head = False  # the pretrained LM head (often tied to the embeddings) stays as it is
    packable = True
    chat_data = True
    gguf_export = True


@register_task_spec
class PreferenceSpec(CausalLMSpec):
    """Preference optimisation of a causal LM (DPO and kin, KTO) on chosen/rejected replies."""

    name = "preference"
    #: Validation: how often the chosen reply out-scores the rejected one, by how much,
    #: and how far the policy moved from the reference (KL on the chosen replies).
    metric_names = ("reward_accuracy", "reward_margin", "kl")
    lower_better_metrics = frozenset({"kl"})
    packable = False  # two sequences per pair, scored side by side
    feature_cacheable = False


@register_task_spec
class RLSpec(CausalLMSpec):
    """Online reinforcement fine-tuning of a causal LM (GRPO, RLOO) on sampled completions."""

    name = "rl"
    #: Validation: the mean reward of sampled completions, their KL to the reference
    #: and their length.
    metric_names = ("reward", "reward_std", "kl", "completion_length")
    lower_better_metrics = frozenset({"kl"})
    packable = False  # rows are made at rollout time
    feature_cacheable = False
    chat_data = False  # prompts and the columns rewards read (tasks/rl_data.py)
    #: One batch of prompts becomes ``rl.iterations`` updates on its rollouts.
    online = True
    validation_loss = False


@register_task_spec
class RewardModelSpec(TaskSpec):
    """A scalar reward head on an encoder or a decoder, trained on chosen/rejected pairs."""

    name = "reward_model"
    metric_names = ("pairwise_accuracy",)
    chat_data = True  # pairs come in the preference layout (strings or messages)
    feature_cacheable = False  # two sequences per pair


@register_task_spec
class Seq2SeqSpec(TaskSpec):
    """Text to text with an encoder-decoder LM: translation, summarisation, rewriting."""

    name = "seq2seq"
    metric_names = ("bleu", "chrf")
    peft_task_type = "SEQ_2_SEQ_LM"
    new_head = False

    @classmethod
    def default_metric(cls, cfg: Any) -> str:
        """BLEU when validation generates text, else the loss (the only metric left)."""
        return cls.metric_names[0] if cfg.generate.in_eval else "loss"

    @classmethod
    def check_config(cls, cfg: Any) -> list[Problem]:
        """BLEU/chrF exist only when validation generates: refuse them as ``eval.metric`` else."""
        if not cfg.generate.in_eval and cfg.eval.metric in cls.metric_names:
            return [
                Problem(
                    "eval.metric",
                    f"eval.metric {cfg.eval.metric} is computed from generated text, but "
                    "generate.in_eval is false; set generate.in_eval=true or eval.metric=loss",
                )
            ]
        return []


@register_task_spec
class MultiTaskSpec(TaskSpec):
    """Several classification / token-classification tasks on one shared encoder."""

    name = MULTITASK
    metric_names = ("average",)
    peft_task_type = None
    mixed_batches = False
    sub_tasks = True

    @classmethod
    def default_metric(cls, cfg: Any) -> str:
        return "average"

    @classmethod
    def higher_is_better(cls, metric: str, cfg: Any) -> bool:
        """``<task>/<metric>`` goes the way its task declares; ``average`` up, losses down."""
        name, _, own = metric.partition("/")
        if own and name in cfg.multitask.tasks:
            sub = TASK_SPECS.get(cfg.multitask.tasks[name].type)
            return sub.higher_is_better(own, sub_config(cfg, name))
        return super().higher_is_better(metric, cfg)

    @classmethod
    def check_config(cls, cfg: Any) -> list[Problem]:
        problems = []
        if not METHOD_SPECS.get(cfg.method.name).multitask_encoder:
            usable = [s.name for s in all_method_specs() if s.multitask_encoder]
            problems.append(
                Problem(
                    "method.name",
                    f"method.name: '{cfg.method.name}' is not available with task.type "
                    "multitask (its virtual tokens need peft's single-task model classes); "
                    f"use {', '.join(usable[:-1])} or {usable[-1]}",
                )
            )
        if cfg.train.feature_cache in ("memory", "disk"):
            problems.append(
                Problem(
                    "train.feature_cache",
                    f"train.feature_cache: '{cfg.train.feature_cache}' is not available with "
                    "task.type multitask (the cache batches all training examples by length, "
                    "multi-task batches hold one task each); use auto or off",
                )
            )
        for name, sub in cfg.multitask.tasks.items():
            problems += TASK_SPECS.get(sub.type).check_config(sub_config(cfg, name))
        return problems
