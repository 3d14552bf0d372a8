"""LoRA, DoRA, IA3, prefix and prompt tuning through ``peft`` (the field's library).

One class per family, all sharing: the task head stays trainable and is saved
with the adapter (``modules_to_save``: the head-loss bug other tools had),
checkpoints are standard peft adapter folders (``PeftModel.from_pretrained``
on the base loads them), parameter groups follow the layer map so
``lr_multipliers``/``llrd`` and per-group gradient norms work as for the
layer methods, and ``train_layers`` restricts LoRA/IA3 to the top blocks.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from tunesmith.config.method_specs import DoRASpec, IA3Spec, LoRASpec, PrefixSpec, PromptSpec
from tunesmith.config.specs import TASK_SPECS
from tunesmith.errors import ConfigError, ModelError
from tunesmith.methods.base import Method, ParamGroup, register_method
from tunesmith.methods.quantized_base import (
    QuantizedBase,
    is_quantized,
    merge_dequantized,
    quantize_base,
    read_marker,
    write_marker,
)
from tunesmith.methods.selection import lr_multiplier_fn
from tunesmith.models.layers import (
    EMBEDDINGS,
    HEAD,
    LayerMap,
    decoder_only,
    discover_layers,
    head_module_names,
)
from tunesmith.models.loading import first_line, unpickling_refused

log = logging.getLogger(__name__)

#: Tried in order when peft has no default for a model type: first set fully present wins.
_FALLBACK_TARGETS = (
    ("query", "value"),
    ("q_proj", "v_proj"),
    ("q_lin", "v_lin"),
    ("q", "v"),
    ("c_attn",),
    ("query_key_value",),
    ("Wqkv",),
)
_PREFIXES = ("base_model.model.", "base_model.")


class PeftMethod(Method):
    """Shared machinery; subclasses build the ``peft`` config."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.layers: LayerMap | None = None
        self.head_modules: list[str] = []
        self.padding_side: str | None = None

    def peft_config(self, model: nn.Module) -> Any:
        """The ``peft`` config for ``model`` (the head is added by ``apply``)."""
        raise NotImplementedError

    def apply(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        self.layers = discover_layers(model, self.cfg.method.blocks)
        # A pretrained LM head (seq2seq) stays frozen: saving it with the adapter would
        # copy a vocabulary-sized matrix and untie it from the embeddings.
        self.head_modules = head_module_names(model) if self.task_has_new_head() else []
        model = self.prepare_base(model)
        config = self.peft_config(model)
        config.modules_to_save = list(self.head_modules) or None  # peft extends the list
        wrapped = get_peft_model(model, config)
        adapted = sorted(
            name.removeprefix("base_model.model.")
            for name, module in wrapped.named_modules()
            if _is_adapted(module)
        )
        if adapted:
            log.info("%s wraps %d modules: %s", self.name, len(adapted), _sample(adapted))
        log.info("trained and saved with the adapter: %s", ", ".join(self.head_modules) or "-")
        return wrapped

    def prepare_base(self, model: nn.Module) -> nn.Module:
        """Change the frozen base before peft wraps it (QLoRA quantizes it); default: nothing."""
        return model

    # -- groups -------------------------------------------------------------
    def group_for(self, name: str) -> str:
        """Layer group of a (peft-prefixed) parameter name."""
        assert self.layers is not None, "apply() first"
        inner = _strip(name)
        if inner.startswith("prompt_encoder") or name.startswith("prompt_encoder"):
            return EMBEDDINGS
        if any(inner.startswith(h + ".") for h in self.head_modules):
            return HEAD
        return self.layers.group_for(inner) or HEAD

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        assert self.layers is not None, "apply() first"
        multiplier = lr_multiplier_fn(self.cfg.method, self.layers)
        ratio = getattr(self.cfg.method, "loraplus_lr_ratio", None)
        groups: dict[str, ParamGroup] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            group = self.group_for(name)
            key, mult = group, multiplier(group)
            if ratio and ".lora_B." in name:  # LoRA+: B learns ``ratio`` times faster
                key, mult = f"{group}/lora_B", mult * ratio
            groups.setdefault(key, ParamGroup(key, [], mult)).params.append((name, p))
        order = {g: i for i, g in enumerate(self.layers.groups)}
        return sorted(groups.values(), key=lambda g: (order.get(g.name.split("/")[0], 0), g.name))

    def layer_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        out: dict[str, list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            out.setdefault(self.group_for(name), []).append(p)
        order = {g: i for i, g in enumerate(self.layers.groups)} if self.layers else {}
        return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))

    # -- checkpoints ----------------------------------------------------------
    @classmethod
    def load_saved(cls, base: nn.Module, folder: Path) -> nn.Module:
        from peft import PeftModel

        with adapter_load_errors(folder):
            return PeftModel.from_pretrained(base, str(folder)).eval()

    @classmethod
    def merged(cls, model: nn.Module) -> nn.Module | None:
        return model.merge_and_unload()

    # -- helpers for subclasses ------------------------------------------------
    def task_type(self) -> str | None:
        return TASK_SPECS.get(self.cfg.task.type).peft_task_type

    def targets(self, model: nn.Module, family: str) -> list[str]:
        """Target module names: configured patterns (checked) or the architecture default.

        With ``train_layers`` the patterns are resolved to the full names of
        the matching modules inside the top blocks only.
        """
        m = self.cfg.method
        names = [n for n, mod in model.named_modules() if _is_linear(mod)]
        patterns = list(m.target_modules) if m.target_modules else _default_targets(model, family)
        if not patterns:
            raise ConfigError(
                f"method.target_modules: no default for {type(model).__name__}; name the "
                "modules to adapt (e.g. ['q_proj', 'v_proj'])"
            )
        for pattern in patterns:
            if not any(_matches(n, pattern) for n in names):
                raise ConfigError(
                    f"method.target_modules: '{pattern}' matches no linear module "
                    f"(linear modules look like: {_sample(names)})"
                )
        if m.train_layers is None:
            return patterns
        assert self.layers is not None
        top = set(self.layers.top_blocks(m.train_layers))
        chosen = [
            n
            for n in names
            if any(_matches(n, p) for p in patterns) and self.layers.group_for(n) in top
        ]
        if not chosen:
            raise ConfigError("method.train_layers: no target module lies in the top blocks")
        return chosen


@register_method
class LoRA(LoRASpec, PeftMethod):
    """Low-rank updates ``W + (alpha/r) B A`` on the target projections.

    With ``quantize_base`` (QLoRA) the frozen base's linear weights are held in
    NF4 or int8 (``methods.quantized_base``); the adapters and the head train in
    full precision on top.
    """

    use_dora = False

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.quantized: QuantizedBase | None = None

    def prepare_base(self, model: nn.Module) -> nn.Module:
        if self.cfg.method.quantize_base:
            self.quantized = quantize_base(
                model, self.cfg.method.quantize_base, keep=self.head_modules
            )
        return model

    def save_weights(
        self, model: nn.Module, folder: Path, weights: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        super().save_weights(model, folder, weights)
        if self.quantized is not None:  # eval/predict quantize the base again the same way
            write_marker(folder, self.quantized)

    @classmethod
    def load_saved(cls, base: nn.Module, folder: Path) -> nn.Module:
        recorded = read_marker(folder)
        if recorded is not None:
            kind, modules = recorded
            quantize_base(base, kind, only=modules)
        return super().load_saved(base, folder)

    @classmethod
    def merged(cls, model: nn.Module) -> nn.Module | None:
        if any(is_quantized(p) for p in model.parameters()):
            return merge_dequantized(model)
        return super().merged(model)

    def peft_config(self, model: nn.Module) -> Any:
        from peft import LoraConfig

        m = self.cfg.method
        return LoraConfig(
            task_type=self.task_type(),
            r=m.r,
            lora_alpha=m.alpha if m.alpha is not None else 2 * m.r,
            lora_dropout=m.dropout,
            use_rslora=m.rslora,
            use_dora=self.use_dora,
            target_modules=self.targets(model, "lora"),
        )


@register_method
class DoRA(DoRASpec, LoRA):
    """LoRA with a learned magnitude per output (weight-decomposed)."""

    use_dora = True


@register_method
class IA3(IA3Spec, PeftMethod):
    """Learned rescaling vectors of keys, values and the FFN activations."""

    def peft_config(self, model: nn.Module) -> Any:
        from peft import IA3Config

        targets = self.targets(model, "ia3")
        ffn = _default_feedforward(model)
        feedforward = [t for t in targets if any(_matches(t, f) or t == f for f in ffn)]
        return IA3Config(
            task_type=self.task_type(), target_modules=targets, feedforward_modules=feedforward
        )


@register_method
class PrefixTuning(PrefixSpec, PeftMethod):
    """Trained key/value prefixes in every attention layer."""

    def peft_config(self, model: nn.Module) -> Any:
        from peft import PrefixTuningConfig

        m = self.cfg.method
        return PrefixTuningConfig(
            task_type=self.task_type(),
            num_virtual_tokens=m.num_virtual_tokens,
            prefix_projection=m.prefix_projection,
        )

    merge_blocker = "its virtual tokens are extra inputs, not changes to weights"

    @classmethod
    def merged(cls, model: nn.Module) -> nn.Module | None:
        return None


@register_method
class PromptTuning(PromptSpec, PrefixTuning):
    """Trained virtual-token embeddings prepended to the input."""

    def peft_config(self, model: nn.Module) -> Any:
        from peft import PromptTuningConfig

        if decoder_only(model):
            # The input arrives as embeddings, so a decoder classifier cannot find
            # the last real token through pad ids: pad on the left instead.
            self.padding_side = "left"
        return PromptTuningConfig(
            task_type=self.task_type(), num_virtual_tokens=self.cfg.method.num_virtual_tokens
        )


# -- helpers ------------------------------------------------------------------
@contextmanager
def adapter_load_errors(folder: Path | str) -> Iterator[None]:
    """Turn peft's failures to load an adapter folder into one-line ``ModelError``s."""
    try:
        yield
    except pickle.UnpicklingError as err:  # peft reads .bin adapters with weights_only=True
        raise unpickling_refused(folder, err) from err
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise ModelError(f"{folder}: cannot load the adapter ({first_line(err)})") from err
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        raise ModelError(
            f"{folder}: the adapter's tensor shapes do not fit the base model (it was trained "
            "on another base model)"
        ) from err


def _strip(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    return name.replace(".modules_to_save.default", "").replace(".original_module", "")


def _is_adapted(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") or hasattr(module, "ia3_l")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _matches(name: str, pattern: str) -> bool:
    """peft's rule: the full name, or a dotted suffix of it."""
    return name == pattern or name.endswith("." + pattern)


def _default_targets(model: nn.Module, family: str) -> list[str]:
    from peft.utils import constants

    mapping = {
        "lora": constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
        "ia3": constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    }[family]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in mapping:
        return list(mapping[model_type])
    names = [n for n, mod in model.named_modules() if _is_linear(mod)]
    for candidate in _FALLBACK_TARGETS:
        if all(any(_matches(n, c) for n in names) for c in candidate):
            return list(candidate)
    return []


def _default_feedforward(model: nn.Module) -> list[str]:
    from peft.utils import constants

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return list(
        constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, [])
    )


def _sample(names: list[str], k: int = 4) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > k else ""
    return ", ".join(names[:k]) + more
