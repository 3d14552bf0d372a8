"""The ``regularize`` and ``forgetting`` sections.

Kept apart from ``config.py`` like every other section. ``regularize`` holds
what constrains the weights on the run's own data (dropout, L2-SP; weight decay
stays ``optim.weight_decay``); ``forgetting`` holds what protects a *reference*
task while a new one is learned (EWC, replay) and measures how much of it was
kept.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from tunesmith.config.base import Section


class RegularizeConfig(Section):
    """Dropout overrides and L2-SP (pull toward the pretrained weights)."""

    hidden_dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Set the model's hidden dropout at load time (BERT hidden_dropout_prob, "
        "T5 dropout_rate, GPT-2 resid_pdrop/embd_pdrop, DistilBERT dropout); null: as saved.",
    )
    attention_dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Set the attention-probability dropout at load time (BERT "
        "attention_probs_dropout_prob, Llama/DistilBERT attention_dropout, GPT-2 attn_pdrop).",
    )
    l2_sp: float = Field(
        0.0,
        ge=0,
        description="L2-SP strength alpha: adds alpha * sum (theta - theta_start)^2 over the "
        "trained weights, theta_start their value when training starts (pretrained weights; "
        "adapters at init). A newly initialised head is left to weight decay. Logged as "
        "loss/l2_sp.",
    )


class ForgettingConfig(Section):
    """Protect a reference task while learning a new one: EWC, replay, forgetting report."""

    reference_checkpoint: str | None = Field(
        None,
        description="A tunesmith checkpoint (best/) that does the reference task: its head "
        "scores the reference data and gives the EWC Fisher; its encoder weights are matched "
        "by name. null: the run's own model as loaded (same task and labels).",
    )
    reference_data: str | None = Field(
        None,
        description="Labelled reference data, read with the reference checkpoint's column "
        "settings (else the run's); null: the validation split of the reference "
        "checkpoint's run.",
    )
    reference_samples: int | None = Field(
        1000, gt=0, description="Use at most this many reference examples (seeded); null: all."
    )
    ewc: float = Field(
        0.0,
        ge=0,
        description="EWC strength lambda: adds lambda * sum F (theta - theta_ref)^2, F the "
        "diagonal Fisher on the reference data (stored as ewc.safetensors in the run "
        "folder). Logged as loss/ewc.",
    )
    fisher_samples: int = Field(
        256, gt=0, description="Reference examples the Fisher is averaged over (one at a time)."
    )
    replay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of each epoch's training examples drawn from the reference data "
        "(seeded per epoch); needs reference data the run's task and labels can train on.",
    )
    report: bool = Field(
        True,
        description="Evaluate the reference task before and after training; summary.json "
        "gets forgetting.retention: after / before of its headline metric, before / after "
        "where lower is better (perplexity), so 1.0 is nothing forgotten either way.",
    )
    reference_text: str | None = Field(
        None,
        description="causal_lm: general text the model should not forget (a .txt file of "
        "paragraphs, a table with data.text_column, or asset:hamlet); its held-out "
        "perplexity is measured before and after training (at most reference_samples "
        "documents). With replay, half of its documents are held out for the measurement "
        "and the rest are replayed, every token trained.",
    )
    probe_prompts: list[str] = Field(
        default_factory=list,
        description="causal_lm: prompts answered greedily before and after training, side "
        "by side in the summary and the report (what a perplexity cannot show).",
    )
    max_ppl_increase: float | None = Field(
        None,
        gt=1,
        description="With reference_text: the largest reference perplexity ratio after / "
        "before accepted (e.g. 1.10: 10% worse); a run past it is marked "
        "(forgetting.exceeded) and the log names the remedy (forgetting.replay of general "
        "text). null: measured, never marked.",
    )

    @model_validator(mode="after")
    def _needs_a_reference(self) -> ForgettingConfig:
        if self.reference_text is not None and (
            self.reference_checkpoint is not None or self.reference_data is not None
        ):
            raise ValueError(
                "reference_text is the reference of a generative run; it cannot be combined "
                "with reference_checkpoint or reference_data (a classification reference)"
            )
        if self.max_ppl_increase is not None and self.reference_text is None:
            raise ValueError("max_ppl_increase needs reference_text (the text it is measured on)")
        if not self.active:
            for key in ("ewc", "replay"):
                if getattr(self, key):
                    raise ValueError(
                        f"{key} needs a reference: set reference_data (and reference_checkpoint "
                        "when the reference task is not the run's own), or reference_text for "
                        "a generative run"
                    )
        return self

    @property
    def active(self) -> bool:
        """Whether a reference is configured at all."""
        return any(
            key is not None
            for key in (self.reference_checkpoint, self.reference_data, self.reference_text)
        )
