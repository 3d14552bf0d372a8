"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2020), our own implementation.

A bottleneck adapter is a small residual MLP, ``h + up(act(down(h)))``, with
``down: d -> d / reduction_factor`` and ``up`` back to ``d``. ``up`` starts at
zero, so an untrained adapter is exactly the identity and training starts from
the pretrained model's function.

Adapters are inserted without touching the base model's code or parameter
names: each adapted module gets a ``tunesmith_adapters`` ``ModuleDict``
(so the adapters are ordinary sub-modules: ``named_parameters``, ``.to()`` and
``state_dict`` see them) and a forward hook that passes the first element of
the module's output through its adapter. Placement ``pfeiffer`` adapts each
block's output; ``houlsby`` also the output of the block's attention
sub-module. Everything else is frozen except the task head.

Checkpoints hold only the adapter and head tensors
(``adapter_model.safetensors``) plus ``bottleneck_config.json`` saying where
the adapters go; ``load_saved`` rebuilds them on a freshly loaded base.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.config.method_specs import BottleneckSpec
from tunesmith.errors import ConfigError, ModelError
from tunesmith.methods.base import register_method
from tunesmith.methods.selection import LayeredMethod
from tunesmith.models.adapter_modules import BottleneckAdapter, map_hidden
from tunesmith.models.layers import HEAD, LayerMap, discover_layers, head_module_names

log = logging.getLogger(__name__)

#: Attribute (a ``ModuleDict``) holding the adapters of an adapted module.
ADAPTERS_ATTR = "tunesmith_adapters"
#: Adapter keys: after a block, after its attention sub-module.
OUTPUT = "output"
ATTENTION = "attention"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "bottleneck_config.json"
FORMAT_VERSION = 1

_HIDDEN_KEYS = ("hidden_size", "d_model", "n_embd", "dim")
#: Child names that are an attention sub-module (``attention``, ``self_attn``, ``SelfAttention``).
_ATTENTION_NAME = re.compile(r"(self_?)?(attn|attention)", re.IGNORECASE)
_ATTENTION_LIKE = re.compile(r"attn|attention", re.IGNORECASE)


# -- insertion -------------------------------------------------------------------
def _adapter_hook(key: str, module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: the first element of ``output`` through ``module``'s adapter ``key``.

    A module-level function bound to a key (not a closure over the adapter), so
    a deep-copied or pickled model uses its own adapters.
    """
    adapter = module._modules[ADAPTERS_ATTR][key]  # type: ignore[index]
    return map_hidden(output, lambda hidden: _run(adapter, hidden, module), module)


def _run(adapter: BottleneckAdapter, hidden: torch.Tensor, module: nn.Module) -> torch.Tensor:
    if hidden.shape[-1] != adapter.hidden_size:
        raise ModelError(
            f"bottleneck: {type(module).__name__} outputs hidden states of size "
            f"{hidden.shape[-1]}, its adapter expects {adapter.hidden_size}"
        )
    return adapter(hidden)


def add_adapter(
    module: nn.Module, key: str, hidden_size: int, reduction_factor: int, activation: str
) -> BottleneckAdapter:
    """Attach a new adapter to ``module``'s output (sub-module + forward hook)."""
    adapters = module._modules.get(ADAPTERS_ATTR)
    if adapters is None:
        adapters = nn.ModuleDict()
        module.add_module(ADAPTERS_ATTR, adapters)
    if key in adapters:
        raise ConfigError(
            f"{type(module).__name__} already has a bottleneck adapter '{key}' "
            "(the method was applied twice)"
        )
    try:
        adapter = BottleneckAdapter(hidden_size, reduction_factor, activation)
    except ValueError as err:
        raise ConfigError(f"method.reduction_factor: {err}") from None
    ref = next(module.parameters(), None)
    if ref is not None:
        adapter.to(device=ref.device)
    adapter.train(module.training)
    adapters[key] = adapter
    module.register_forward_hook(functools.partial(_adapter_hook, key))
    return adapter


def adapters_of(model: nn.Module) -> list[tuple[str, str, BottleneckAdapter]]:
    """Every adapter of ``model``: ``(adapted module path, key, adapter)``, in module order."""
    found = []
    for path, module in model.named_modules():
        adapters = module._modules.get(ADAPTERS_ATTR)
        if isinstance(adapters, nn.ModuleDict):
            for key, adapter in adapters.items():
                if isinstance(adapter, BottleneckAdapter):
                    found.append((path, key, adapter))
    return found


def attention_child(block: nn.Module) -> str | None:
    """Path (relative to ``block``) of its attention sub-module, or None.

    The first child named like an attention module (``attention``, ``attn``,
    ``self_attn``, ``SelfAttention``); else the first child whose name contains
    ``attn``/``attention`` (not a norm); else T5's ``layer.0`` (the
    self-attention sub-layer of a ``layer`` list).
    """
    children = [
        (name, child)
        for name, child in block.named_children()
        if name != ADAPTERS_ATTR and any(True for _ in child.parameters())
    ]
    for name, child in children:
        if _ATTENTION_NAME.fullmatch(name) and not isinstance(child, nn.ModuleList):
            return name
    for name, child in children:
        if (
            _ATTENTION_LIKE.search(name)
            and "norm" not in name.lower()
            and not isinstance(child, (nn.ModuleList, nn.ModuleDict))
        ):
            return name
    layers = block._modules.get("layer")
    if (
        isinstance(layers, nn.ModuleList)
        and len(layers)
        and any(_ATTENTION_LIKE.search(n) for n, _ in layers[0].named_children())
    ):
        return "layer.0"
    return None


def hidden_size_of(model: nn.Module, block: nn.Module) -> int:
    """The hidden size: from the model config, else guessed from the block's parameters.

    The guess is the size of the block's first one-dimensional norm weight, else
    the input size of its first linear layer, else the most common dimension
    among its parameters.
    """
    config = getattr(model, "config", None)
    for key in _HIDDEN_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    for name, p in block.named_parameters():
        if p.ndim == 1 and "norm" in name.lower():
            return int(p.shape[0])
    for module in block.modules():
        if isinstance(module, nn.Linear):
            return module.in_features
    dims = Counter(int(d) for p in block.parameters() for d in p.shape)
    if not dims:
        raise ConfigError(f"cannot tell the hidden size of {type(block).__name__}")
    return dims.most_common(1)[0][0]


def _head_names(model: nn.Module, layers: LayerMap) -> list[str]:
    """Head modules (``head_module_names``) whose parameters are all in the head group."""
    heads = []
    for name in head_module_names(model):
        params = [f"{name}.{n}" for n, _ in model.get_submodule(name).named_parameters()]
        if params and all(layers.group_of.get(p) == HEAD for p in params):
            heads.append(name)
    return heads


def _saved_names(model: nn.Module, heads: list[str]) -> list[str]:
    """Names of the parameters a checkpoint holds: every adapter's, then the head's."""
    prefixes = tuple(f"{h}." for h in heads)
    return [
        n
        for n, _ in model.named_parameters()
        if f".{ADAPTERS_ATTR}." in n or n.startswith(prefixes)
    ]


# -- the method --------------------------------------------------------------------
@register_method
class Bottleneck(BottleneckSpec, LayeredMethod):
    """Bottleneck adapters in every (or the top ``train_layers``) block; head trains too.

    ``lr_multipliers``/``llrd`` apply per block as for the layer methods: an
    adapter in block k learns at block k's rate, the head at the head's.
    """

    merge_blocker = (
        "the non-linearity between its down and up projections cannot be folded into linear weights"
    )

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.head_modules: list[str] = []

    def apply(self, model: nn.Module) -> nn.Module:
        m = self.cfg.method
        if m.train_layers == 0:
            raise ConfigError(
                "method.train_layers: 0 adapts no block; use method 'freeze' to train the "
                "head alone"
            )
        layers = discover_layers(model, m.blocks)
        self.head_modules = _head_names(model, layers) if self.task_has_new_head() else []
        blocks = _target_blocks(layers, m.train_layers)
        plan = plan_adapters(model, blocks, m.placement)
        modules = dict(model.named_modules())
        for path, key in plan:
            block = modules[path if key == OUTPUT else _block_of(path, blocks)]
            add_adapter(
                modules[path], key, hidden_size_of(model, block), m.reduction_factor, m.activation
            )
        count = sum(p.numel() for _, _, a in adapters_of(model) for p in a.parameters())
        log.info(
            "bottleneck (%s, d/%d, %s): %d adapters in %d blocks, %d parameters",
            m.placement,
            m.reduction_factor,
            m.activation,
            len(plan),
            len(blocks),
            count,
        )
        log.info("trained and saved with the adapters: %s", ", ".join(self.head_modules) or "-")
        # The layer map of the adapted model (same block lists): an adapter belongs to
        # its block's group, so the layer methods' grouping and LR shaping apply as is.
        self.layers = discover_layers(model, layers.stacks)
        self.selected = self.select(model, self.layers)
        for name, p in model.named_parameters():
            p.requires_grad_(name in self.selected)
        return model

    def select(self, model: nn.Module, layers: LayerMap) -> set[str]:
        """Every adapter parameter plus the head's."""
        return set(_saved_names(model, self.head_modules))

    # -- checkpoints ------------------------------------------------------------
    def save_weights(
        self, model: nn.Module, folder: Path, weights: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """``adapter_model.safetensors`` (adapters + head only) and ``bottleneck_config.json``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        found = adapters_of(model)
        if not found:
            raise ModelError("bottleneck: the model has no adapters to save (apply() first)")
        names = set(_saved_names(model, self.head_modules))
        source = weights if weights is not None else dict(model.named_parameters())
        tensors = {
            n: p.detach().to("cpu").contiguous().clone() for n, p in source.items() if n in names
        }
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        m = self.cfg.method
        sizes = sorted({a.hidden_size for _, _, a in found})
        config = {
            "method": self.name,
            "format": FORMAT_VERSION,
            "base_model": self.cfg.model.name_or_path,
            "reduction_factor": m.reduction_factor,
            "placement": m.placement,
            "activation": m.activation,
            "hidden_size": sizes[0] if len(sizes) == 1 else sizes,
            "blocks": sorted({p for p, k, _ in found if k == OUTPUT}, key=_natural),
            "adapters": [
                {"module": path, "key": key, "hidden_size": a.hidden_size} for path, key, a in found
            ],
            "head": self.head_modules,
        }
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load_saved(cls, base: nn.Module, folder: Path) -> nn.Module:
        """Insert the saved adapters into ``base`` and load the adapter and head tensors.

        Raises:
            ModelError: The folder lacks the files, a module is missing from the
                base, or the tensors do not match the expected names and shapes.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise ModelError(f"{folder}: not a bottleneck adapter folder ({path.name} missing)")
        config = json.loads(config_path.read_text())
        modules = dict(base.named_modules())
        for entry in config["adapters"]:
            module = modules.get(entry["module"])
            if module is None:
                raise ModelError(
                    f"{folder}: the base model has no module '{entry['module']}' for an "
                    "adapter (is it the model the adapters were trained on?)"
                )
            add_adapter(
                module,
                entry["key"],
                entry["hidden_size"],
                config["reduction_factor"],
                config["activation"],
            )
        heads = list(config.get("head", []))
        missing_heads = [h for h in heads if h not in modules]
        if missing_heads:
            raise ModelError(f"{folder}: the base model has no head module {missing_heads}")
        params = dict(base.named_parameters())
        expected = _saved_names(base, heads)
        tensors = load_file(str(weights_path))
        missing = [n for n in expected if n not in tensors]
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ModelError(
                f"{weights_path}: tensors do not match the adapters "
                f"(missing: {missing[:4] or '-'}; unexpected: {unexpected[:4] or '-'})"
            )
        with torch.no_grad():
            for name in expected:
                value, param = tensors[name], params[name]
                if value.shape != param.shape:
                    raise ModelError(
                        f"{weights_path}: '{name}' has shape {tuple(value.shape)}, the model "
                        f"expects {tuple(param.shape)}"
                    )
                param.copy_(value)
        log.info("loaded %d bottleneck adapters from %s", len(config["adapters"]), folder)
        return base.eval()

    @classmethod
    def merged(cls, model: nn.Module) -> nn.Module | None:
        """None: bottleneck adapters cannot be merged into the base weights.

        The non-linearity between the down and up projections cannot be folded
        into the base model's linear weights, so the adapters must stay as
        extra modules (load the checkpoint with tunesmith, or keep the base and
        ``adapter_model.safetensors`` together).
        """
        return None


def _target_blocks(layers: LayerMap, train_layers: int | None) -> list[str]:
    """Module paths of the blocks to adapt: the top ``train_layers`` of each stack, or all."""
    chosen = set(layers.top_blocks(train_layers)) if train_layers is not None else None
    paths = []
    for stack, groups in zip(layers.stacks, layers.blocks, strict=True):
        for index, group in enumerate(groups):
            if chosen is None or group in chosen:
                paths.append(f"{stack}.{index}")
    return paths


def plan_adapters(model: nn.Module, blocks: list[str], placement: str) -> list[tuple[str, str]]:
    """``(module path, key)`` of every adapter to insert; checked before any is inserted."""
    plan = []
    for path in blocks:
        if placement == "houlsby":
            block = model.get_submodule(path)
            child = attention_child(block)
            if child is None:
                names = ", ".join(n for n, _ in block.named_children()) or "none"
                raise ConfigError(
                    f"method.placement: houlsby puts an adapter after each block's attention, "
                    f"but {path} ({type(block).__name__}) has no attention sub-module "
                    f"(children: {names}); use placement: pfeiffer"
                )
            plan.append((f"{path}.{child}", ATTENTION))
        plan.append((path, OUTPUT))
    return plan


def _block_of(path: str, blocks: list[str]) -> str:
    return next(b for b in blocks if path.startswith(b + "."))


def _natural(path: str) -> list[Any]:
    """Sort key putting ``layer.10`` after ``layer.9``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]
