"""The built-in methods as config validation sees them (torch-free; see ``specs``).

Each spec holds a method's name, the ``method.*`` keys it reads and its
capability flags; the method itself (``methods/*.py``) inherits from it.
"""

from __future__ import annotations

from tunesmith.config.specs import MethodSpec, register_method_spec

#: Keys of every layer-based method: which blocks exist and how fast each learns.
SHAPING_KEYS = frozenset({"exclude", "blocks", "lr_multipliers", "llrd", "unfreeze"})
#: Keys of every peft adapter method.
_PEFT_KEYS = frozenset({"blocks", "lr_multipliers", "llrd"})
_LORA_KEYS = _PEFT_KEYS | {
    "target_modules",
    "r",
    "alpha",
    "dropout",
    "rslora",
    "loraplus_lr_ratio",
    "train_layers",
}


@register_method_spec
class FullSpec(MethodSpec):
    """Train everything; the baseline every other method is compared with."""

    name = "full"
    keys = SHAPING_KEYS | {"freeze_embeddings"}


@register_method_spec
class FreezeSpec(MethodSpec):
    """Everything is frozen except the head and the configured additions."""

    name = "freeze"
    keys = SHAPING_KEYS | {
        "train_layers",
        "train_embeddings",
        "train_biases",
        "train_norms",
        "include",
    }


class AdapterSpec(MethodSpec):
    """Base of the methods that train added modules and save only those (and the head)."""

    saves_adapter = True
    peft_adapter = True


@register_method_spec
class LoRASpec(AdapterSpec):
    """Low-rank updates ``W + (alpha/r) B A`` on the target projections (QLoRA: quantize_base)."""

    name = "lora"
    keys = _LORA_KEYS | {"quantize_base"}


@register_method_spec
class DoRASpec(LoRASpec):
    """LoRA with a learned magnitude per output (weight-decomposed)."""

    name = "dora"
    # QLoRA is LoRA only: peft's DoRA cannot take the norm of a torchao NF4 weight.
    keys = _LORA_KEYS


@register_method_spec
class IA3Spec(AdapterSpec):
    """Learned rescaling vectors of keys, values and the FFN activations."""

    name = "ia3"
    keys = _PEFT_KEYS | {"target_modules", "train_layers"}


@register_method_spec
class PrefixSpec(AdapterSpec):
    """Trained key/value prefixes in every attention layer."""

    name = "prefix"
    keys = frozenset({"num_virtual_tokens", "prefix_projection", "lr_multipliers", "blocks"})
    # Virtual tokens: extra inputs per row that frozen blocks see too.
    prefix_cacheable = False
    packable = False
    multitask_encoder = False


@register_method_spec
class PromptSpec(PrefixSpec):
    """Trained virtual-token embeddings prepended to the input."""

    name = "prompt"
    keys = frozenset({"num_virtual_tokens", "lr_multipliers", "blocks"})


@register_method_spec
class BottleneckSpec(AdapterSpec):
    """Bottleneck adapters in every (or the top ``train_layers``) block; head trains too."""

    name = "bottleneck"
    peft_adapter = False  # tunesmith's own modules: the reference is a frozen copy
    keys = frozenset(
        {
            "reduction_factor",
            "placement",
            "activation",
            "train_layers",
            "blocks",
            "lr_multipliers",
            "llrd",
        }
    )
