"""The ``data`` section: which files, which columns, how they are split and cut.

Kept apart from ``config.py`` because every task reads its own columns; a column
key that only one task reads says so in its description.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tunesmith.config.augment import AugmentConfig
from tunesmith.config.base import Section


class CleanConfig(Section):
    """How rows are cleaned on reading; every removed row is counted by reason."""

    normalize: bool = Field(
        True,
        description="Unicode NFC, odd spaces (no-break, zero-width) made plain, runs of "
        "spaces within a line collapsed, ends stripped.",
    )
    drop_duplicates: bool = Field(
        True, description="Drop rows repeating an earlier row of the same file exactly."
    )
    near_duplicate_threshold: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Word-shingle Jaccard similarity from which a validation/test row is "
        "flagged as a near-duplicate of a training row (leakage); flagged, not dropped.",
    )
    imbalance_ratio: float = Field(
        3.0, ge=1, description="Warn when the commonest label is this many times the rarest."
    )


class DataConfig(Section):
    """Where the examples are and how to read them."""

    # Optional here only for multi-task runs, whose tasks name their own files; the
    # Config requires it for every other task (``missing required key 'data.train'``).
    train: str | None = Field(
        None,
        min_length=1,
        description="Training file (csv, jsonl, parquet); required except with task.type "
        "multitask, whose tasks name their own (multitask.tasks.<name>.data).",
    )
    validation: str | None = Field(
        None, description="Validation file; null: split validation_fraction off train."
    )
    test: str | None = Field(None, description="Test file, evaluated once at the end.")
    text_column: str = Field("text", min_length=1, description="Column holding the input text.")
    text_pair_column: str | None = Field(None, description="Second text column for pair tasks.")
    label_column: str = Field("label", min_length=1, description="Column holding the label.")
    # -- multi-label and regression targets (task.problem_type) --
    label_delimiter: str | None = Field(
        None,
        description="multi_label: separator of the labels in a text label column ('|' reads "
        "'PER|LOC' as two); null: the column holds a list (JSONL, parquet). An empty value "
        "is a row with no label.",
    )
    label_columns: list[str] | None = Field(
        None,
        min_length=1,
        description="regression: the numeric target columns, one or several (each a model "
        "output named after its column); null: label_column alone.",
    )
    tokens_column: str = Field(
        "tokens", min_length=1, description="token_classification tables: list of tokens."
    )
    tags_column: str = Field(
        "tags", min_length=1, description="token_classification tables: list of tags (BIO)."
    )
    messages_column: str = Field(
        "messages",
        min_length=1,
        description="causal_lm: column holding a chat as a list of {role, content}; tables "
        "without it use prompt_column/response_column (or instruction/input/output).",
    )
    prompt_column: str = Field(
        "prompt", min_length=1, description="causal_lm: the user's turn when there is no chat."
    )
    response_column: str = Field(
        "response", min_length=1, description="causal_lm: the assistant's reply to train on."
    )
    format: Literal[
        "auto", "messages", "prompt_response", "alpaca", "sharegpt", "text", "preference", "kto"
    ] = Field(
        "auto",
        description="causal_lm: the layout of the data files. auto: detected from the columns "
        "(a file fitting two layouts is refused); messages (OpenAI, with tool_calls, tool "
        "results and a tools column), prompt_response, alpaca (instruction/input/output), "
        "sharegpt (conversations of from/value), preference (prompt/chosen/rejected: SFT on "
        "chosen), kto (prompt/completion/label: SFT on the desirable rows), text (raw "
        "text_column or a .txt file of paragraphs: continued pre-training, every token "
        "trained).",
    )
    roles: dict[str, str] = Field(
        default_factory=dict,
        description="sharegpt: extra 'from' names and the role each becomes (system, user, "
        "assistant, tool, or tool_call for a turn whose value is a function call), merged "
        "over human/gpt/system/observation/function_call.",
    )
    packing: Literal["none", "documents", "concat"] = Field(
        "none",
        description="data.format text: documents: documents (each ending with EOS) packed "
        "into max_length blocks, attention kept inside each document by position_ids, batches "
        "padding-free; concat: GPT-2 style, the token stream cut into max_length blocks, "
        "attention across documents; none: one document per row (long ones in max_length "
        "pieces). Validation always scores one document per row.",
    )
    source_column: str = Field("source", min_length=1, description="seq2seq: input text column.")
    target_column: str = Field("target", min_length=1, description="seq2seq: output text column.")
    max_target_length: int = Field(
        128, gt=0, description="seq2seq: target tokens per example; longer ones are cut."
    )
    labels: list[str] | None = Field(
        None,
        description="Allow-list of labels (numbers read as text); rows with other labels "
        "are dropped and counted. null: every label in the train split.",
    )
    max_length: int = Field(128, gt=0, description="Tokens per example; longer ones are cut.")
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of train rows held out when validation is null."
    )
    test_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of train rows held out as test if test is null."
    )
    max_train_samples: int | None = Field(
        None, gt=0, description="Cap on training rows after splitting, for quick runs."
    )
    split_seed: int | None = Field(
        None,
        description="Seed of the validation/test split made off train; null: train.seed. "
        "Fix it to compare training seeds (or K-shot samples) on one held-out split.",
    )
    limit_per_class: int | None = Field(
        None,
        gt=0,
        description="Few-shot: keep K training rows per label (seeded by train.seed), after "
        "splitting; sequence_classification only.",
    )
    clean: CleanConfig = Field(default_factory=CleanConfig, description="Row cleaning.")
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig,
        description="Training-data augmentation (training split only, seeded).",
    )
    group_by_length: bool = Field(True, description="Batch similar lengths: less padding.")
    length_window: int | None = Field(
        None,
        gt=0,
        description="group_by_length: batches per sorting window (each window of examples is "
        "sorted by length and cut into batches; 1 is random batches). null: chosen per run: "
        "at most 50 and at most a quarter of the epoch, and smaller, down to random batches, "
        "where text length predicts the label (single-label classification; the log says "
        "which and why).",
    )
    padding_free: bool = Field(
        False,
        description="causal_lm: train on packed rows (a batch's examples concatenated, "
        "attention kept within each by position_ids): no padding at all.",
    )
    # Pre-flight truncation gate of generative tasks (tasks/truncation.py).
    max_truncated_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="causal_lm, seq2seq: a run is refused, before the model loads, when more "
        "than this share of training rows has its answer or final end-of-turn/EOS token cut "
        "by max_length (seq2seq: max_target_length); 1 turns the gate off.",
    )
    drop_truncated: bool = Field(
        False,
        description="causal_lm, seq2seq: drop the training rows whose answer or final "
        "end-of-turn/EOS token is cut (counted in the log and splits.json) instead of refusing.",
    )
    empty_rows: Literal["drop", "error"] = Field(
        "drop",
        description="Rows with an empty text or label: drop them (counted in the log) or fail.",
    )

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_text(cls, value: Any) -> Any:
        # Label columns often hold 0/1; accept them as the text the data reader compares.
        if not isinstance(value, list):
            return value
        return [
            str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for v in value
        ]

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct (got {self.labels})")
        if self.labels == []:
            raise ValueError("labels must not be empty; use null to keep every label")
        roles = {"system", "user", "assistant", "tool", "tool_call"}
        for name, role in self.roles.items():
            if role not in roles:
                raise ValueError(
                    f"roles.{name}: {role!r} is not a role; use one of {', '.join(sorted(roles))}"
                )
        held_out = (self.validation_fraction if self.validation is None else 0.0) + (
            self.test_fraction if self.test is None else 0.0
        )
        if held_out >= 1:
            raise ValueError(f"validation_fraction + test_fraction = {held_out:g}; keep it below 1")
        return self

    @property
    def packed_rows(self) -> bool:
        """Whether training batches are one packed row (``padding_free`` or document packing)."""
        return self.padding_free or self.packing == "documents"
