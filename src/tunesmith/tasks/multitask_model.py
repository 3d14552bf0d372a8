"""The multi-task model: one shared encoder, a private head per task.

The encoder is the base model as ``AutoModel`` loads it (no head); each task
gets its own head of the kind its task type needs, the same layers the
transformers ``*For...Classification`` classes put on top:

* ``sequence_classification``: dropout and a linear layer on the pooled state
  (the encoder's pooler output where it has one, as BERT's classifier reads;
  else the first token, or the last real token for decoder-only models);
* ``token_classification``: dropout and a linear layer on every token.

A batch holds one task's examples and says which through its ``task_id``
feature (the same id for every row), so only that head runs and only its
parameters get a gradient. The heads live in one ``TaskHeads`` module called
with the task id: adapter methods (peft) keep it trainable and wrap it as one
module (``modules_to_save``), and the layer map puts it in the ``head`` group,
so every method treats all heads as "the head".

Shared-private training (``multitask.task_adapters``) adds a private
bottleneck adapter per task after every encoder block, in a ``TaskAdapters``
module beside the heads: the method (full, LoRA, ...) adapts the shared
encoder, each task also trains its own adapters, and a batch runs only its
task's. The blocks call them through a forward hook that looks the module up
on the model at call time, so an adapter method's trained copy
(``modules_to_save``) is the one that runs. The active task is set by
``forward`` and read by the hooks, which also hold during the re-computation
of gradient checkpointing (one task per forward and backward).

Saved, a model is ``encoder/`` (a transformers folder, or the adapter of an
adapter method) plus ``heads/<task>.safetensors`` per task, whose metadata
names the task type and its labels and which also holds the task's private
adapters (``adapter.<block>.*``): the encoder is written once, whatever the
number of tasks.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from tunesmith.errors import ModelError
from tunesmith.models.adapter_modules import BottleneckAdapter, map_hidden
from tunesmith.models.layers import decoder_only, discover_layers

ENCODER_DIR = "encoder"
HEADS_DIR = "heads"
#: Config attributes holding a model's classifier dropout, first found wins.
_DROPOUT_KEYS = (
    "classifier_dropout",
    "seq_classif_dropout",
    "hidden_dropout_prob",
    "hidden_dropout",
    "dropout",
    "resid_pdrop",
)
_HIDDEN_KEYS = ("hidden_size", "d_model", "dim", "n_embd")
#: Modules of the multi-task model saved per task, not with the encoder.
PRIVATE = ("heads", "task_adapters")
#: Their tensors in a peft state dict of the multi-task model (saved apart).
_PEFT_PRIVATE = tuple(f"base_model.model.{name}." for name in PRIVATE)
#: Key prefix of a task's private adapters in its head file.
_ADAPTER_KEY = "adapter."


@dataclass
class MultiTaskOutput(ModelOutput):
    """What the model returns: the logits of the batch's task (``outputs[0]``)."""

    logits: torch.Tensor | None = None


class SequenceHead(nn.Module):
    """Dropout and a linear layer on the pooled state: one label per example."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(pooled))


class TokenHead(SequenceHead):
    """Dropout and a linear layer on every token: one label per token."""

    def forward(self, hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(hidden))


#: Head class per task type: one for each task spec with ``multitask_head`` (``config.task_specs``).
HEADS: dict[str, type[SequenceHead]] = {
    "sequence_classification": SequenceHead,
    "token_classification": TokenHead,
}


class TaskHeads(nn.Module):
    """Every task's head; ``forward`` runs the one of the given task.

    A plain module rather than a ``ModuleDict`` so that peft can wrap all heads
    as one trainable module (it refuses containers without a ``forward``).
    """

    def __init__(self, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.by_task = nn.ModuleDict(dict(heads))
        self.order = list(heads)

    def forward(self, task: int, hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.by_task[self.order[task]](hidden, pooled)


class TaskAdapters(nn.Module):
    """Per task, one bottleneck adapter per encoder block; ``forward`` runs one of them.

    Args:
        names: The tasks, in task-id order.
        blocks: Number of encoder blocks.
        hidden_size: Size of the blocks' hidden states.
        reduction_factor: Bottleneck of ``hidden_size // reduction_factor`` units.
        activation: The adapters' activation.
    """

    def __init__(
        self,
        names: Sequence[str],
        blocks: int,
        hidden_size: int,
        reduction_factor: int,
        activation: str,
    ) -> None:
        super().__init__()
        self.order = list(names)
        # Dicts keyed "0", "1", ... rather than ModuleLists: block-stack discovery looks
        # for ModuleLists and must not take a task's adapters for transformer blocks.
        self.by_task = nn.ModuleDict(
            {
                name: nn.ModuleDict(
                    {
                        str(i): BottleneckAdapter(hidden_size, reduction_factor, activation)
                        for i in range(blocks)
                    }
                )
                for name in names
            }
        )

    def forward(self, task: int, block: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.by_task[self.order[task]][str(block)](hidden)


def _task_adapter_hook(
    owner: MultiTaskModel, block: int, module: nn.Module, args: Any, output: Any
) -> Any:
    """After encoder block ``block``: its hidden states through the active task's adapter."""
    task = owner.active_task
    if task is None:
        raise ModelError("the multi-task encoder ran outside MultiTaskModel.forward (no task)")
    return map_hidden(output, functools.partial(owner.task_adapters, task, block), module)


class MultiTaskModel(nn.Module):
    """A shared encoder plus ``TaskHeads``; ``forward(task_id=..., **encoder inputs)``.

    Args:
        encoder: The base model without a head (``AutoModel``).
        heads: One head per task, in task-id order.
        labels: Each task's label names (saved with its head).
        types: Each task's task type (saved with its head).
        task_adapters: Private adapters per task (shared-private training), or None.
    """

    #: Like a transformers model: parameters outside ``encoder.`` are the head.
    base_model_prefix = "encoder"

    def __init__(
        self,
        encoder: nn.Module,
        heads: TaskHeads,
        labels: Mapping[str, Sequence[str]],
        types: Mapping[str, str],
        task_adapters: TaskAdapters | None = None,
        blocks: Sequence[nn.Module] = (),
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = heads
        self.labels = {name: list(labs) for name, labs in labels.items()}
        self.types = dict(types)
        # Decoder-only models have no [CLS]: their last real token sees the whole text.
        self.last_token = decoder_only(encoder)
        self.active_task: int | None = None
        if task_adapters is not None:
            self.task_adapters = task_adapters
            for i, block in enumerate(blocks):
                block.register_forward_hook(functools.partial(_task_adapter_hook, self, i))

    @property
    def config(self) -> Any:
        """The encoder's config (peft and the methods read the architecture from it)."""
        return self.encoder.config

    def forward(
        self,
        task_id: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **inputs: Any,
    ) -> MultiTaskOutput:
        first = task_id.reshape(-1)[0]
        if bool((task_id != first).any()):
            raise ValueError("a multi-task batch mixes tasks; every batch must hold one task")
        self.active_task = int(first)
        out = self.encoder(attention_mask=attention_mask, **inputs)
        hidden = out[0]
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = self._token_state(hidden, attention_mask)
        return MultiTaskOutput(logits=self.heads(int(first), hidden, pooled))

    def _token_state(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The first token's state; for decoders the last real token's (either padding side)."""
        if not self.last_token:
            return hidden[:, 0]
        if mask is None:
            return hidden[:, -1]
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.long() * (positions + 1)).argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    # -- what the methods and the loop ask of a model --------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.encoder.gradient_checkpointing_enable(**kwargs)

    # -- saving ----------------------------------------------------------------------
    def live_heads(self) -> TaskHeads:
        """The heads that run: peft trains a copy of a wrapped module, not the original."""
        return _live(self.heads)

    def live_adapters(self) -> TaskAdapters | None:
        """The private adapters that run (peft's trained copy), or None without any."""
        adapters = getattr(self, "task_adapters", None)
        return None if adapters is None else _live(adapters)

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        """``encoder/`` as a transformers folder plus ``heads/<task>.safetensors``."""
        self.encoder.save_pretrained(Path(folder) / ENCODER_DIR, safe_serialization=True)
        self.save_heads(folder)

    def save_heads(self, folder: str | Path) -> None:
        """One safetensors file per task: its head and private adapters; its metadata
        holds the task type and labels."""
        from safetensors.torch import save_file

        target = Path(folder) / HEADS_DIR
        target.mkdir(parents=True, exist_ok=True)
        heads, adapters = self.live_heads(), self.live_adapters()
        for name in heads.order:
            state = dict(heads.by_task[name].state_dict())
            if adapters is not None:
                own = adapters.by_task[name].state_dict()
                state |= {_ADAPTER_KEY + k: v for k, v in own.items()}
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
            metadata = {
                "format": "pt",
                "task": name,
                "type": self.types[name],
                "labels": json.dumps(self.labels[name]),
            }
            save_file(tensors, str(target / f"{name}.safetensors"), metadata=metadata)

    def load_heads(self, folder: str | Path) -> None:
        """Load every head from ``heads/<task>.safetensors``.

        Raises:
            ModelError: A head file is missing or its tensors do not fit.
        """
        from safetensors.torch import load_file

        heads, adapters = self.live_heads(), self.live_adapters()
        for name in heads.order:
            path = Path(folder) / HEADS_DIR / f"{name}.safetensors"
            if not path.is_file():
                raise ModelError(f"{folder}: no head for task '{name}' ({path} missing)")
            state = load_file(str(path))
            own = {
                k[len(_ADAPTER_KEY) :]: v for k, v in state.items() if k.startswith(_ADAPTER_KEY)
            }
            if bool(own) != (adapters is not None):
                raise ModelError(
                    f"{path}: the saved task {'has' if own else 'has no'} private adapters, "
                    f"this model {'has' if adapters is not None else 'has none'} "
                    "(multitask.task_adapters differs from the run's)"
                )
            try:
                heads.by_task[name].load_state_dict(
                    {k: v for k, v in state.items() if not k.startswith(_ADAPTER_KEY)}
                )
                if adapters is not None:
                    adapters.by_task[name].load_state_dict(own)
            except RuntimeError as err:
                raise ModelError(f"{path}: the head does not fit this model ({err})") from None


def build_heads(
    encoder: nn.Module, labels: Mapping[str, Sequence[str]], types: Mapping[str, str]
) -> TaskHeads:
    """A new head per task, sized from the encoder's config, Xavier-initialised.

    The init matches what ``modeling.load_pretrained`` gives a new head
    (Xavier-uniform weights, zero biases), so a task's head starts as in its
    single-task run.
    """
    config = encoder.config
    hidden = hidden_size(encoder)
    dropout = next(
        (float(v) for k in _DROPOUT_KEYS if isinstance(v := getattr(config, k, None), float)), 0.1
    )
    heads = {name: HEADS[types[name]](hidden, len(labels[name]), dropout) for name in labels}
    for head in heads.values():
        nn.init.xavier_uniform_(head.classifier.weight)
        nn.init.zeros_(head.classifier.bias)
    return TaskHeads(heads)


def build_task_adapters(
    encoder: nn.Module,
    names: Sequence[str],
    reduction_factor: int,
    activation: str,
    block_paths: Sequence[str] | None = None,
) -> tuple[TaskAdapters, list[nn.Module]]:
    """Private adapters for every task and the encoder blocks they follow (bottom to top).

    Args:
        block_paths: The block lists' paths in the encoder, where introspection
            finds none (``method.blocks``).
    """
    stacks = discover_layers(encoder, block_paths).stacks
    blocks = [block for path in stacks for block in encoder.get_submodule(path)]
    adapters = TaskAdapters(names, len(blocks), hidden_size(encoder), reduction_factor, activation)
    return adapters, blocks


def hidden_size(encoder: nn.Module) -> int:
    """The encoder's hidden size, from its config."""
    config = encoder.config
    hidden = next((getattr(config, k) for k in _HIDDEN_KEYS if _is_int(getattr(config, k, 0))), 0)
    if not hidden:
        raise ModelError(f"cannot tell the hidden size of {type(encoder).__name__}")
    return hidden


def _live(module: nn.Module) -> Any:
    """``module`` itself, or the trained copy when peft wrapped it (``modules_to_save``)."""
    copies = getattr(module, "modules_to_save", None)
    if copies is not None:
        return copies[module.active_adapters[0]]
    return module


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def unwrap(model: Any) -> MultiTaskModel:
    """The ``MultiTaskModel`` inside a peft wrapper (or the model itself)."""
    return model if isinstance(model, MultiTaskModel) else model.get_base_model()


def save_adapter_encoder(method: Any, model: Any, folder: Path) -> None:
    """The adapter of an adapter method into ``folder``, without the heads (saved apart).

    peft: the adapter's tensors and config, the config without
    ``modules_to_save``, so ``PeftModel.from_pretrained`` leaves the heads
    plain modules for ``load_heads``. Bottleneck: the method's own files,
    written while it lists no head module.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if not hasattr(model, "peft_config"):
        held, method.head_modules = method.head_modules, []
        try:
            method.save_weights(model, folder)
        finally:
            method.head_modules = held
        return
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    name = model.active_adapter
    state = get_peft_model_state_dict(model, adapter_name=name)
    tensors = {
        key: value.detach().to("cpu").contiguous()
        for key, value in state.items()
        if not key.startswith(_PEFT_PRIVATE)
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config[name])
    config.modules_to_save = None
    config.inference_mode = True
    config.save_pretrained(str(folder))
