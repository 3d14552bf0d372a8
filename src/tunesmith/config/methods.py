"""The ``method`` config section: which parameters train, and how fast.

Keys shared by the layer-based methods live here: layer selection
(``train_layers``, globs, BitFit-style switches), learning-rate shaping
(``lr_multipliers``, ``llrd``) and progressive unfreezing. Each method spec
declares which keys it uses (``MethodSpec.keys``, ``config/method_specs.py``);
setting a key the chosen method ignores is an error that says so, instead of a
silent no-op.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from tunesmith.config.base import Section, check_choice
from tunesmith.config.specs import METHOD_SPECS


def known_methods() -> tuple[str, ...]:
    """The method names ``method.name`` accepts: the method spec registry's."""
    return tuple(METHOD_SPECS.names())


class LrMultipliers(Section):
    """Pyramid learning rates: a multiplier of ``optim.lr`` per part of the model."""

    embeddings: float = Field(1.0, gt=0, description="Multiplier for the embeddings.")
    blocks: float | tuple[float, float] = Field(
        1.0,
        description="Multiplier for every block, or [bottom, top] interpolated linearly "
        "from the lowest to the highest block.",
    )
    head: float = Field(1.0, gt=0, description="Multiplier for the task head.")

    @field_validator("blocks")
    @classmethod
    def _positive(cls, value: float | tuple[float, float]) -> float | tuple[float, float]:
        values = value if isinstance(value, tuple) else (value,)
        if any(v <= 0 for v in values):
            raise ValueError(f"multipliers must be > 0 (got {value})")
        return value


class UnfreezeConfig(Section):
    """Progressive (ULMFiT-style) unfreezing: the head first, then one block more at a time."""

    every_steps: int | None = Field(
        None, gt=0, description="Unfreeze one more block every N steps."
    )
    every_epochs: int | None = Field(
        None, gt=0, description="Unfreeze one more block every N epochs."
    )
    start_layers: int = Field(0, ge=0, description="Top blocks trainable from the start.")
    max_layers: int | None = Field(
        None, ge=1, description="Stop after this many top blocks; null: every selected block."
    )
    warmup_steps: int = Field(
        0, ge=0, description="Linear LR warmup of a newly unfrozen block, in steps."
    )

    @model_validator(mode="after")
    def _one_interval(self) -> UnfreezeConfig:
        if (self.every_steps is None) == (self.every_epochs is None):
            raise ValueError("set exactly one of every_steps or every_epochs")
        return self


class MethodConfig(Section):
    """How the weights are updated (full fine-tuning, freezing, ...)."""

    name: str = Field(
        "full",
        description="Fine-tuning method: full | freeze | lora | dora | ia3 | prefix | prompt | "
        "bottleneck.",
    )
    train_layers: int | None = Field(
        None, ge=0, description="freeze: train the top N blocks of each stack plus the head."
    )
    train_embeddings: bool = Field(False, description="freeze: also train the embeddings.")
    freeze_embeddings: bool = Field(False, description="full: keep the embeddings frozen.")
    train_biases: bool = Field(False, description="freeze: also train every bias (BitFit).")
    train_norms: bool = Field(False, description="freeze: also train every normalisation layer.")
    include: list[str] = Field(
        default_factory=list, description="Glob patterns of parameter names to train as well."
    )
    exclude: list[str] = Field(
        default_factory=list, description="Glob patterns of parameter names to freeze (wins)."
    )
    blocks: list[str] | None = Field(
        None, description="Module paths of the block lists, when discovery fails."
    )
    lr_multipliers: LrMultipliers | None = Field(
        None, description="Pyramid LR multipliers for embeddings / blocks / head."
    )
    llrd: float | None = Field(
        None, gt=0, le=1, description="Layer-wise LR decay: block k from the top gets lr*llrd^k."
    )
    unfreeze: UnfreezeConfig | None = Field(None, description="Progressive unfreezing.")
    # -- adapters (lora, dora, ia3, prefix, prompt, bottleneck) --------------------
    target_modules: list[str] | None = Field(
        None,
        description="lora/dora/ia3: module name patterns to adapt; null: per-architecture "
        "default (query/value projections; IA3 adds key and the FFN output).",
    )
    r: int = Field(8, ge=1, description="lora/dora: rank of the update.")
    alpha: float | None = Field(None, gt=0, description="lora/dora: scaling alpha; null: 2*r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="lora/dora: dropout on the adapter input.")
    rslora: bool = Field(False, description="lora/dora: rank-stabilised scaling alpha/sqrt(r).")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="lora/dora: LoRA+ learning-rate ratio of B over A (e.g. 16)."
    )
    quantize_base: Literal["nf4", "int8"] | None = Field(
        None,
        description="lora: QLoRA, the frozen base's linear weights held in 4-bit NF4 or int8 "
        "(CPU: torchao, pip install 'tunesmith[qlora]'; CUDA: pip install bitsandbytes); "
        "eval and predict quantize the base the same way; null: full precision.",
    )
    num_virtual_tokens: int = Field(20, ge=1, description="prefix/prompt: virtual tokens.")
    prefix_projection: bool = Field(
        False, description="prefix: reparameterise the prefix through an MLP."
    )
    reduction_factor: int = Field(
        16, ge=1, description="bottleneck: hidden size / adapter bottleneck size."
    )
    placement: Literal["houlsby", "pfeiffer"] = Field(
        "pfeiffer",
        description="bottleneck: pfeiffer = after each block's FFN; houlsby = after the "
        "attention and after the FFN.",
    )
    activation: Literal["relu", "gelu", "tanh", "silu"] = Field(
        "relu", description="bottleneck: non-linearity between the down and up projections."
    )

    @field_validator("name")
    @classmethod
    def _known_name(cls, value: str) -> str:
        return check_choice("method", value, known_methods())

    @field_validator("*")
    @classmethod
    def _key_fits_the_method(cls, value: Any, info: ValidationInfo) -> Any:
        """A key the chosen method does not read is an error, not a silent no-op."""
        name = info.data.get("name")
        if info.field_name == "name" or name is None or not _is_set(value):
            return value
        default = cls.model_fields[info.field_name].get_default(call_default_factory=True)
        if value == default:  # resolved configs spell out every default
            return value
        accepted = METHOD_SPECS.get(name).keys
        if info.field_name not in accepted:
            raise ValueError(
                f"does not apply to method '{name}' "
                f"(it takes: {', '.join(sorted(accepted)) or 'no options'})"
            )
        return value


def _is_set(value: Any) -> bool:
    """A key written with its neutral value (null, false, []) does not count as set."""
    if value is None or value is False:
        return False
    return not (isinstance(value, (list, dict)) and not value)
