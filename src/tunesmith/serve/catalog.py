"""The models a server answers for: adapters over base models that are held once.

Every served checkpoint is a *model id*. Adapter checkpoints (peft methods and
our bottleneck adapters) trained on the same base share that base's weight
tensors: the base is loaded once, and each module tree that runs adapters is
a shallow clone of it whose base parameters are the very same tensors
(``shared_clone``), so an adapter costs its own weights and a few module
objects, never another copy of the base.

The trees:

- one *LoRA tree* per base holds every plain LoRA adapter (peft), so a batch
  of requests for different LoRA adapters runs as one forward (peft's
  ``adapter_names``: the base computes once, each adapter adds its low-rank
  update to its own rows);
- every other adapter (DoRA, IA3, prefix and prompt classifiers, bottleneck;
  peft supports mixed batches for LoRA only) gets a tree of its own and runs
  in its own sub-batch;
- a checkpoint that is not an adapter (full or partial fine-tuning, int8 or
  pruned exports, QLoRA) is loaded as it is, a model of its own.

Loading and unloading happen between scheduling rounds (the scheduler calls
them), so no forward pass ever sees a tree change under it.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.config.root import Config
from tunesmith.errors import ConfigError
from tunesmith.methods.base import METHODS
from tunesmith.methods.bottleneck import Bottleneck
from tunesmith.methods.peft_methods import PeftMethod, adapter_load_errors
from tunesmith.methods.quantized_base import read_marker
from tunesmith.models.generator import Generator
from tunesmith.models.layers import head_module_names
from tunesmith.models.loading import (
    check_base_model,
    check_weights,
    checkpoint_manifest,
    load_tokenizer,
    quiet_transformers,
)
from tunesmith.runs.library import saved_shapes, shape_heads_for
from tunesmith.runs.load import load_checkpoint
from tunesmith.tasks.base import Task, get_task
from tunesmith.training.allocator import release_free_memory

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
#: Methods whose adapters peft can batch with others of the same base (``adapter_names``).
_MIXED = {"lora"}
#: Prompt-learning adapters feed the model its own cache; the batched generator holds one.
_PROMPT_LEARNING = {"prefix", "prompt"}
#: The files a tokenizer is read from (whichever a folder has).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
#: Decoder-only tasks whose checkpoints answer completions.
_GENERATIVE = {"causal_lm", "preference", "rl"}
_SAFETENSORS_ONLY = "the server loads safetensors weights only; convert the checkpoint"


@dataclass
class Tree:
    """One module tree that runs requests: the LoRA tree of a base, or one model's own.

    Attributes:
        model: The module tree (a peft model, a base with bottleneck adapters, a plain model).
        names: The model ids it serves.
        mixed: Requests of different ids may share one forward (``adapter_names``).
        generator: The batched generator over ``model`` (causal LMs only).
    """

    key: str
    model: Any
    names: set[str] = field(default_factory=set)
    mixed: bool = False
    generator: Generator | None = None

    def activate(self, name: str) -> None:
        """Make ``name`` the adapter that runs when no per-row names are given."""
        if self.mixed and len(self.names) > 1:
            self.model.set_adapter(name)


@dataclass
class Served:
    """One model id: its checkpoint, task and the tree that runs it."""

    name: str
    folder: Path
    cfg: Config
    task: Task
    labels: list[str]
    tokenizer: Any
    tree: Tree
    manifest: dict[str, Any]
    weights_bytes: int

    @property
    def method(self) -> str:
        return self.cfg.method.name

    @property
    def generative(self) -> bool:
        """Answers chat and text completions (a decoder-only causal LM)."""
        return self.tree.generator is not None

    @property
    def adapter(self) -> str | None:
        """The name rows of a mixed batch pass to peft (None outside a LoRA tree)."""
        return self.name if self.tree.mixed else None


@dataclass
class _Base:
    """A base model held once, and the LoRA tree over it (made on its first LoRA adapter)."""

    model: Any
    lora: Tree | None = None


class Catalog:
    """The served model ids, loaded and unloaded at run time.

    Args:
        library: The only folder ``load`` accepts adapters from at run time
            (None: loading at run time is off).
        trust_remote_code: Run model folders' own code (the caller's choice, never a folder's).
    """

    def __init__(self, library: Path | None = None, *, trust_remote_code: bool = False) -> None:
        quiet_transformers()
        self.library = library.resolve() if library is not None else None
        self.trust_remote_code = trust_remote_code
        self.served: dict[str, Served] = {}
        self._bases: dict[str, _Base] = {}
        self._tokenizers: dict[str, Any] = {}

    # -- queries -------------------------------------------------------------------
    def get(self, name: str) -> Served:
        """The model id ``name``; ``KeyError`` naming the ids served."""
        if name not in self.served:
            raise KeyError(name)
        return self.served[name]

    def names(self) -> list[str]:
        return sorted(self.served)

    def base_tensors(self) -> dict[str, int]:
        """Bytes of every distinct parameter and buffer storage held, by base key.

        The proof that a base is stored once: however many adapters are
        loaded, its storages are counted once (adapter tensors are extra).
        """
        out: dict[str, int] = {}
        for key, base in self._bases.items():
            out[key] = _storage_bytes([base.model])
        return out

    def storage_bytes(self) -> int:
        """Bytes of every distinct tensor storage of every tree (shared storages once)."""
        return _storage_bytes([s.tree.model for s in self.served.values()])

    # -- loading -------------------------------------------------------------------
    def add(self, name: str, folder: str | Path) -> Served:
        """Load checkpoint ``folder`` as model id ``name``.

        Raises:
            ConfigError: A bad or taken name, or a checkpoint the server cannot run.
            ModelError: Not a checkpoint, pickle weights, or a missing base model.
        """
        if not _NAME.match(name):
            raise ConfigError(f"model id '{name}': use letters, digits, '.', '_', ':' or '-'")
        if name in self.served:
            raise ConfigError(f"model id '{name}' is already served; unload it first")
        folder = Path(folder)
        manifest = checkpoint_manifest(folder)
        check_weights(folder, hint=_SAFETENSORS_ONLY)
        method = METHODS.get(manifest["method"])
        shares = method.saves_adapter and read_marker(folder) is None
        if manifest["method"] in _PROMPT_LEARNING and manifest["task"] in _GENERATIVE:
            raise ConfigError(
                f"{folder}: a {manifest['method']}-tuned {manifest['task']} model cannot be "
                "served: the batched generator keeps its own cache, where peft puts the "
                "virtual tokens; use tunesmith predict, or train with lora"
            )
        if shares:
            served = self._add_adapter(name, folder, manifest)
        else:
            served = self._add_model(name, folder, manifest)
        self.served[name] = served
        release_free_memory()  # the load's transient copies go back to the system
        log.info("serving %s (%s, %s) from %s", name, served.method, served.cfg.task.type, folder)
        return served

    def add_from_library(self, name: str, relative: str | None = None) -> Served:
        """Load ``library/<relative or name>`` (an admin request): refused outside the library.

        Raises:
            ConfigError: Loading at run time is off, the path leaves the library
                folder (``..``, an absolute path, a link out of it) or is no checkpoint.
        """
        if self.library is None:
            raise ConfigError(
                "loading adapters at run time needs the server started with --library"
            )
        folder = (self.library / (relative or name)).resolve()
        if not folder.is_relative_to(self.library) or folder == self.library:
            raise ConfigError(f"'{relative or name}' is not a folder inside the adapter library")
        if not (folder / "tunesmith.json").is_file():
            raise ConfigError(f"'{relative or name}' is not a checkpoint in the adapter library")
        return self.add(name, folder)

    def remove(self, name: str) -> None:
        """Stop serving ``name`` and free its weights (the base stays while others use it)."""
        served = self.served.pop(name)
        used = {id(s.tokenizer) for s in self.served.values()}
        self._tokenizers = {k: t for k, t in self._tokenizers.items() if id(t) in used}
        tree = served.tree
        tree.names.discard(name)
        if tree.mixed and tree.names:
            tree.model.delete_adapter(name)
            tree.model.set_adapter(sorted(tree.names)[0])
            return
        for key, base in list(self._bases.items()):
            if base.lora is tree:
                base.lora = None
            if not self._uses(key):
                del self._bases[key]

    def _uses(self, key: str) -> bool:
        return any(s.tree.key.startswith(key) for s in self.served.values())

    def _add_model(self, name: str, folder: Path, manifest: dict[str, Any]) -> Served:
        cfg, task, model, tokenizer, labels = load_checkpoint(
            folder, trust_remote_code=self.trust_remote_code
        )
        tree = Tree(f"own:{name}", model.eval(), {name})
        return self._served(name, folder, cfg, task, labels, tokenizer, tree, manifest)

    def _add_adapter(self, name: str, folder: Path, manifest: dict[str, Any]) -> Served:
        check_base_model(folder, manifest)
        cfg = Config.from_dict(manifest["config"], source=str(folder / "tunesmith.json"))
        cfg = cfg.model_copy(
            update={
                "model": cfg.model.model_copy(update={"trust_remote_code": self.trust_remote_code})
            }
        )
        task = get_task(cfg)
        labels = list(manifest.get("labels", []))
        tokenizer = self._tokenizer(folder, manifest.get("padding_side"))
        task.restore_state(manifest.get("task_state") or {})
        key = _base_key(manifest, task)
        if key not in self._bases:
            self._bases[key] = _Base(task.build_model(labels, tokenizer).eval())
        base = self._bases[key]
        method = METHODS.get(cfg.method.name)
        if cfg.method.name in _MIXED:
            tree = self._into_lora_tree(base, key, name, folder)
        elif issubclass(method, PeftMethod) or issubclass(method, Bottleneck):
            clone = shared_clone(base.model, folder)
            tree = Tree(f"{key}#{name}", method.load_saved(clone, folder).eval(), {name})
        else:  # pragma: no cover - every adapter method is one of the above
            raise ConfigError(f"{folder}: method {cfg.method.name} cannot be served")
        task.loaded(tree.model, tokenizer, str(folder))
        return self._served(name, folder, cfg, task, labels, tokenizer, tree, manifest)

    def _tokenizer(self, folder: Path, padding_side: str | None) -> Any:
        """The checkpoint's tokenizer, shared with every adapter whose tokenizer files match.

        A 49k-token tokenizer takes more memory than a LoRA adapter of rank 8:
        loaded once per adapter, it would cost four times the adapter.
        """
        digest = hashlib.sha256(str(padding_side).encode())
        for name in _TOKENIZER_FILES:
            if (folder / name).is_file():
                digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
        key = digest.hexdigest()
        if key not in self._tokenizers:
            tokenizer = load_tokenizer(str(folder))
            tokenizer.padding_side = padding_side or tokenizer.padding_side
            self._tokenizers[key] = tokenizer
        return self._tokenizers[key]

    def _into_lora_tree(self, base: _Base, key: str, name: str, folder: Path) -> Tree:
        """Load LoRA adapter ``name`` into the base's LoRA tree (made on the first)."""
        from peft import PeftModel

        with adapter_load_errors(folder):
            if base.lora is None:
                clone = shared_clone(base.model, folder)
                model = PeftModel.from_pretrained(clone, str(folder), adapter_name=name)
                base.lora = Tree(f"{key}#lora", model.eval(), set(), mixed=True)
            else:
                shape_heads_for(base.lora.model, folder, name)
                base.lora.model.load_adapter(str(folder), adapter_name=name)
                base.lora.model.eval()
        base.lora.names.add(name)
        return base.lora

    def _served(
        self,
        name: str,
        folder: Path,
        cfg: Config,
        task: Task,
        labels: list[str],
        tokenizer: Any,
        tree: Tree,
        manifest: dict[str, Any],
    ) -> Served:
        tree.names.add(name)
        if tree.generator is None and _decoder_only_lm(tree.model):
            tree.generator = Generator(tree.model, tokenizer)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        return Served(name, folder, cfg, task, labels, tokenizer, tree, manifest, size)


def _base_key(manifest: dict[str, Any], task: Task) -> str:
    """Adapters share a base when the base model, its version and the model class agree."""
    signature = manifest.get("base_signature") or {}
    version = ",".join(f"{k}={signature[k]}" for k in sorted(signature))
    return f"{manifest['base_model']}|{version}|{task.auto_class().__name__}"


def _decoder_only_lm(model: Any) -> bool:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(inner).__name__.endswith("ForCausalLM")


def shared_clone(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers are the same tensors.

    Adapters injected into the clone (peft wrappers, bottleneck modules) leave
    the original alone, while the base weights exist once. A task head whose
    weights the adapter checkpoint in ``folder`` holds (a classifier's) is
    copied for real, shaped like the saved one: it is loaded in place. A head
    the adapter does not train (a causal LM's, often tied to the embeddings)
    stays shared.
    """
    saved = saved_shapes(folder)
    private = set()
    for head in head_module_names(model):
        if any(_unwrapped(key).startswith(f"{head}.") for key in saved):
            private |= {id(t) for t in model.get_submodule(head).parameters()}
    private -= {id(t) for t in _body_of(model).parameters()}  # tied to the body: shared
    memo: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in private:
            memo[id(tensor)] = tensor
    clone = copy.deepcopy(model, memo)
    _resize_heads(clone, saved)
    return clone


def _unwrapped(key: str) -> str:
    """A saved tensor's name in the model peft wrapped (ours are saved unwrapped)."""
    for prefix in ("base_model.model.", "base_model."):  # weight adapters, prompt learning
        if key.startswith(prefix):
            return key.removeprefix(prefix)
    return key


def _body_of(model: torch.nn.Module) -> torch.nn.Module:
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, model) if prefix else model


def _resize_heads(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """Shape the head parameters of ``model`` like the checkpoint's (its own label count)."""
    unwrapped = {_unwrapped(key): shape for key, shape in shapes.items()}
    heads = tuple(f"{h}." for h in head_module_names(model))
    for pname, param in model.named_parameters():
        saved = unwrapped.get(pname)
        if pname.startswith(heads) and saved is not None and tuple(param.shape) != saved:
            param.data = torch.empty(saved, dtype=param.dtype)


def _storage_bytes(models: list[Any]) -> int:
    seen: dict[int, int] = {}
    for model in models:
        for tensor in [*model.parameters(), *model.buffers()]:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def library_models(library: Path) -> dict[str, Path]:
    """Model id -> folder of every checkpoint in an adapter library folder."""
    if not library.is_dir():
        raise ConfigError(f"{library}: no such adapter library folder")
    found = {p.name: p for p in sorted(library.iterdir()) if (p / "tunesmith.json").is_file()}
    if not found:
        raise ConfigError(f"{library}: holds no checkpoint (tunesmith adapters add NAME CKPT)")
    return found
