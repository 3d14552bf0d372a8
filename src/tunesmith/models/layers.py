"""Layer discovery: embeddings, the ordered transformer blocks and the head.

Works by introspection, not a list of architectures: the blocks are the
``ModuleList``s whose children are all of one class (BERT ``encoder.layer``,
Llama ``model.layers``, GPT-2 ``h``, T5 ``encoder.block`` and
``decoder.block``); stacks much smaller than the largest are ignored. The
head is everything outside the base model (``base_model_prefix``). Other
parameters are placed by position:

* before the first block of the model -> ``embeddings``;
* inside a stack's container after its blocks (a final norm) -> that stack's
  top block;
* anywhere else after the blocks (a pooler) -> ``head``.

Blocks are numbered from the input; "top N" means the last N of each stack
(for encoder-decoders, of both stacks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from tunesmith.errors import ConfigError

EMBEDDINGS = "embeddings"
HEAD = "head"
#: A stack is ignored when its parameters are below this share of the largest stack's.
_MIN_STACK_SHARE = 0.1


@dataclass
class LayerMap:
    """Where every parameter of a model sits.

    Attributes:
        stacks: Module paths of the block lists (``["bert.encoder.layer"]``).
        blocks: Per stack, the group names of its blocks, bottom to top.
        group_of: Parameter name -> group name (``embeddings``, a block, ``head``).
    """

    stacks: list[str]
    blocks: list[list[str]]
    group_of: dict[str, str] = field(default_factory=dict)

    @property
    def groups(self) -> list[str]:
        """Group names from the input to the output: embeddings, blocks, head."""
        ordered = [EMBEDDINGS, *(g for stack in self.blocks for g in stack), HEAD]
        present = set(self.group_of.values())
        return [g for g in ordered if g in present]

    def params_of(self, model: nn.Module, group: str) -> list[tuple[str, nn.Parameter]]:
        """The named parameters of ``group``."""
        return [(n, p) for n, p in model.named_parameters() if self.group_of.get(n) == group]

    def top_blocks(self, n: int) -> list[str]:
        """The group names of the top ``n`` blocks of every stack."""
        return [g for stack in self.blocks for g in stack[max(0, len(stack) - n) :]] if n else []

    def depth_from_top(self, group: str) -> int:
        """1 for a top block, 2 for the one below, ...; 0 for the head.

        Embeddings sit one below the deepest block. Used by layer-wise LR decay.
        """
        if group == HEAD:
            return 0
        deepest = max(len(s) for s in self.blocks)
        if group == EMBEDDINGS:
            return deepest + 1
        for stack in self.blocks:
            if group in stack:
                return len(stack) - stack.index(group)
        raise KeyError(group)

    def group_for(self, name: str) -> str | None:
        """Group of a parameter or module name, also for names added after discovery.

        Adapters inserted into a block (``...layer.3.attention.self.query.lora_A``)
        belong to that block; unknown names outside every block give None.
        """
        if name in self.group_of:
            return self.group_of[name]
        return _block_of(name, self.stacks, self.blocks)

    def position(self, group: str) -> float:
        """Relative height of a block in its stack: 0.0 bottom ... 1.0 top."""
        for stack in self.blocks:
            if group in stack:
                return stack.index(group) / max(1, len(stack) - 1)
        raise KeyError(group)


def discover_layers(model: nn.Module, block_paths: Sequence[str] | None = None) -> LayerMap:
    """Map every parameter of ``model`` to embeddings, a block or the head.

    Args:
        model: Any transformers model (or plain module).
        block_paths: Module paths of the block lists, for models whose blocks
            introspection does not find (``method.blocks`` in the config).

    Raises:
        ConfigError: No block list found, or a given path is not a ModuleList.
    """
    modules = dict(model.named_modules())
    stacks = list(block_paths) if block_paths else _find_stacks(model)
    for path in stacks:
        if not isinstance(modules.get(path), nn.ModuleList):
            raise ConfigError(f"method.blocks: '{path}' is not a ModuleList in this model")
    if not stacks:
        raise ConfigError(
            f"no list of transformer blocks found in {type(model).__name__}; name it with "
            "method.blocks (e.g. ['model.layers'])"
        )
    names = _block_group_names(stacks, [len(modules[p]) for p in stacks])
    layer_map = LayerMap(stacks=stacks, blocks=names)
    head_prefix = _head_excluded_prefix(model)
    params = [name for name, _ in model.named_parameters()]
    owner = {name: _block_of(name, stacks, names) for name in params}
    block_idx = [i for i, name in enumerate(params) if owner[name] is not None]
    if not block_idx:
        raise ConfigError(f"the block lists {stacks} hold no parameters")
    last_of_stack = {
        path: max(i for i, n in enumerate(params) if n.startswith(path + ".")) for path in stacks
    }
    for i, name in enumerate(params):
        group = owner[name]
        if group is None:
            if head_prefix is not None and not name.startswith(head_prefix):
                group = HEAD
            elif (top := _stack_top(name, i, stacks, names, last_of_stack)) is not None:
                group = top
            else:
                group = EMBEDDINGS if i < block_idx[0] else HEAD
        layer_map.group_of[name] = group
    return layer_map


def _find_stacks(model: nn.Module) -> list[str]:
    """ModuleLists of identical, parameterised children, outermost only, large enough."""
    candidates: list[tuple[str, int]] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if any(path.startswith(c + ".") for c, _ in candidates):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size:
            candidates.append((path, size))
    if not candidates:
        return []
    largest = max(size for _, size in candidates)
    return [path for path, size in candidates if size >= _MIN_STACK_SHARE * largest]


def _block_group_names(stacks: list[str], lengths: list[int]) -> list[list[str]]:
    """``block.i`` for one stack; ``<stack>.block.i`` (``encoder``/``decoder``) for several."""
    if len(stacks) == 1:
        return [[f"block.{i}" for i in range(lengths[0])]]
    labels = []
    for path in stacks:
        parts = path.split(".")
        others = [p.split(".") for p in stacks if p != path]
        # The first path component that tells this stack apart from the others.
        distinct = next(
            (
                part
                for i, part in enumerate(parts)
                if all(i >= len(o) or o[i] != part for o in others)
            ),
            path,
        )
        labels.append(distinct)
    return [
        [f"{label}.block.{i}" for i in range(n)] for label, n in zip(labels, lengths, strict=True)
    ]


def _block_of(name: str, stacks: list[str], names: list[list[str]]) -> str | None:
    for path, groups in zip(stacks, names, strict=True):
        if name.startswith(path + "."):
            index = int(name[len(path) + 1 :].split(".", 1)[0])
            return groups[index]
    return None


def _stack_top(
    name: str,
    index: int,
    stacks: list[str],
    names: list[list[str]],
    last_of_stack: dict[str, int],
) -> str | None:
    """The top block of the stack whose container holds ``name`` after its blocks (final norms)."""
    for path, groups in zip(stacks, names, strict=True):
        container = path.rsplit(".", 1)[0] if "." in path else ""
        if container and name.startswith(container + ".") and index > last_of_stack[path]:
            return groups[-1]
    return None


def _head_excluded_prefix(model: nn.Module) -> str | None:
    """``"<base_model_prefix>."`` when the model wraps a base model; None for a bare model."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix + "."
    return None


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level modules outside the base model that hold parameters (the task head).

    ``classifier`` for BERT, ``score`` for Llama, ``classification_head`` for T5,
    ``pre_classifier`` + ``classifier`` for DistilBERT. Adapter methods keep
    these trainable and save them with the adapter.
    """
    prefix = getattr(model, "base_model_prefix", "")
    return [
        name
        for name, child in model.named_children()
        if name != prefix and any(True for _ in child.parameters())
    ]


def decoder_only(model: nn.Module) -> bool:
    """True for a decoder-only (causal LM) architecture: its blocks see only the past."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )
