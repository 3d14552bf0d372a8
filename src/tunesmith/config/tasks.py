"""The ``task`` and ``generate`` sections: what is learned and how text is generated.

Kept apart from ``config.py`` because every task adds its own keys here (a key
that only one task reads says so in its description, and ``tunesmith config
show`` documents it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunesmith.config.base import Section, check_choice
from tunesmith.config.specs import TASK_SPECS


def known_tasks() -> tuple[str, ...]:
    """Return the task names ``task.type`` accepts: the task spec registry's."""
    return tuple(TASK_SPECS.names())


class TaskConfig(Section):
    """What the model learns to do; picks the head, the loss and the metrics."""

    type: str = Field("sequence_classification", description="Task type.")
    label_all_subtokens: bool = Field(
        False,
        description="token_classification: train on every sub-token of a word (B- continuations "
        "as I-); false: only the first, the rest ignored. Metrics always read the first.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Cross-entropy label smoothing epsilon, every task (classification: "
        "with loss.type and loss.class_weights too).",
    )
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant",
        description="causal_lm: which assistant turns are trained; everything else is "
        "masked (-100).",
    )
    chat_template: str | None = Field(
        None,
        description="causal_lm: Jinja chat template used when the tokenizer has none "
        "(or to replace its own); 'plain' is a built-in minimal template.",
    )
    system_prompt: str | None = Field(
        None, description="causal_lm: system message put before every conversation."
    )
    head_in_loss: bool = Field(
        True,
        description="causal_lm: apply the LM head inside the loss, to the labelled positions "
        "only and a few hundred at a time, instead of building every position's logits "
        "(same loss and gradients; less memory and compute). Falls back to the model's own "
        "logits where the head is wrapped by an adapter or the logits are transformed.",
    )
    # -- sequence_classification heads: single-label, multi-label, regression --
    problem_type: Literal["single_label", "multi_label", "regression"] = Field(
        "single_label",
        description="sequence_classification: single_label (softmax, one label per row), "
        "multi_label (a sigmoid per label, any number per row; thresholds tuned on "
        "validation) or regression (one or several numbers per row: data.label_columns).",
    )

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        return check_choice("task type", value, known_tasks())


class GenerateConfig(Section):
    """Text generation for evaluation and ``predict`` (seq2seq, causal_lm)."""

    max_new_tokens: int = Field(64, gt=0, description="Most tokens generated per example.")
    num_beams: int = Field(1, ge=1, description="Beam-search width; 1: greedy or sampling.")
    num_return_sequences: int = Field(
        1, ge=1, description="Sequences returned per input (at most num_beams when not sampling)."
    )
    do_sample: bool = Field(False, description="Sample instead of greedy/beam search.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(50, ge=0, description="Sample among the k likeliest tokens; 0: all.")
    in_eval: bool = Field(
        True,
        description="Generate during validation for text metrics (BLEU/chrF); false: "
        "loss-based metrics only (faster).",
    )
    eval_samples: int | None = Field(
        None, gt=0, description="Generate for at most this many validation examples; null: all."
    )

    @model_validator(mode="after")
    def _beams_cover_returns(self) -> GenerateConfig:
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"num_return_sequences ({self.num_return_sequences}) exceeds num_beams "
                f"({self.num_beams}); raise num_beams or set do_sample=true"
            )
        return self
