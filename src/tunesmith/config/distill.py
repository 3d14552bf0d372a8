"""The ``distill`` section: knowledge distillation from a saved tunesmith checkpoint.

Used by ``tunesmith train``: with ``distill.teacher`` set, the model being
trained (the student) learns from the teacher's softened output distribution
as well as from the labels.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from tunesmith.config.base import Section, changed_from_default


class DistillConfig(Section):
    """Teacher, temperature and weight of the distillation term; optional layer-dropped student."""

    teacher: str | None = Field(
        None,
        description="A tunesmith checkpoint (best/ or final/) of the same task and labels, "
        "with the same tokenizer; null: no distillation.",
    )
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="loss = alpha * T^2 * KL(teacher || student at temperature T) + "
        "(1 - alpha) * task loss. Logged as loss/kd (the alpha part).",
    )
    temperature: float = Field(2.0, gt=0, description="Softmax temperature T of both models.")
    student_layers: int | list[int] | None = Field(
        None,
        description="Build the student from the teacher itself, keeping N evenly spaced "
        "blocks (first and last included) or the listed block indices (0 = bottom); null: "
        "the student is model.name_or_path.",
    )
    hidden_weight: float = Field(
        0.0,
        ge=0,
        description="beta of hidden-state matching: adds beta * mean squared difference "
        "between each student block's output and its matched teacher block's (the block it "
        "was copied from, else evenly spaced; same hidden size), logged as loss/hidden. "
        "The teacher then runs on every batch.",
    )
    cache_logits: bool = Field(
        True,
        description="Compute the teacher's logits on the training data once and keep them "
        "(teacher_logits.safetensors in the run folder, reused on resume); false: run the "
        "teacher on every batch.",
    )

    @field_validator("student_layers")
    @classmethod
    def _layers(cls, value: int | list[int] | None) -> int | list[int] | None:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"keep at least one block (got {value})")
        if isinstance(value, list):
            if not value or any(i < 0 for i in value) or len(set(value)) != len(value):
                raise ValueError(f"distinct block indices >= 0 (got {value})")
            return sorted(value)
        return value

    @model_validator(mode="after")
    def _needs_teacher(self) -> DistillConfig:
        changed = changed_from_default(self, (n for n in type(self).model_fields if n != "teacher"))
        if self.teacher is None and changed:
            raise ValueError(f"{changed[0]} is only read with a teacher (distill.teacher)")
        return self
