"""The ``loss`` section: how the classification-like tasks weigh their targets.

Kept apart from ``config.py`` like every other section. Label smoothing stays
one key for every task, ``task.label_smoothing``; this section holds what only
the classification-like tasks (task specs with ``has_classes``: sequence and
token classification) read: the focal loss and class weights.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tunesmith.config.base import Section, changed_from_default

Weights = list[float] | dict[str, float]


class LossConfig(Section):
    """Loss of the classification-like tasks: focal loss, class weights; regression losses."""

    type: Literal["cross_entropy", "focal", "mse", "huber"] = Field(
        "cross_entropy",
        description="cross_entropy (multi_label: binary, a sigmoid per label), or focal: "
        "down-weights examples the model already gets right by (1 - p_true)^focal_gamma "
        "(sequence/token classification); mse or huber for task.problem_type regression "
        "(its default: mse).",
    )
    huber_delta: float = Field(
        1.0, gt=0, description="Huber loss delta (type huber): quadratic below, linear above."
    )
    focal_gamma: float = Field(
        2.0, ge=0, description="Focal-loss gamma (type focal); 0 is cross-entropy."
    )
    focal_alpha: Weights | None = Field(
        None,
        description="Focal-loss alpha per class: a list in label order or {label: alpha} "
        "(unlisted labels 1); multiplies class_weights. RetinaNet's binary alpha a is "
        "{positive: a, negative: 1 - a}.",
    )
    class_weights: Literal["inverse", "effective"] | Weights | None = Field(
        None,
        description="Per-class loss weights: a list in label order, {label: weight} "
        "(unlisted labels 1), inverse (N / (C * n_c), from the training labels) or "
        "effective ((1 - beta) / (1 - beta^n_c), Cui et al. 2019); the loss is the "
        "weighted mean. Computed weights are saved with the checkpoint.",
    )
    effective_beta: float = Field(
        0.999, ge=0, lt=1, description="beta of class_weights: effective (0: all equal)."
    )

    @field_validator("focal_alpha", "class_weights", mode="before")
    @classmethod
    def _label_keys_as_text(cls, value: Any) -> Any:
        # YAML reads label 0/1 keys as numbers; labels are compared as text.
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
        return value

    @field_validator("focal_alpha", "class_weights")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        values = value.values() if isinstance(value, dict) else value
        if isinstance(values, str) or values is None:
            return value
        values = list(values)
        if not values or any(v < 0 for v in values) or not any(v > 0 for v in values):
            raise ValueError(f"weights must be >= 0, at least one > 0 (got {value})")
        return value

    @model_validator(mode="after")
    def _focal_keys_need_focal(self) -> LossConfig:
        changed = changed_from_default(self, ("focal_gamma", "focal_alpha"))
        if changed and self.type != "focal":
            raise ValueError(f"{changed[0]} is only read with type: focal")
        if changed_from_default(self, ["effective_beta"]) and self.class_weights != "effective":
            raise ValueError("effective_beta is only read with class_weights: effective")
        if changed_from_default(self, ["huber_delta"]) and self.type != "huber":
            raise ValueError("huber_delta is only read with type: huber")
        return self

    @property
    def customised(self) -> bool:
        """Whether anything differs from plain cross-entropy."""
        return self.type != "cross_entropy" or self.class_weights is not None
