"""Int8 models for CPU inference: quantize in memory, save with safetensors, load back.

What is quantized, and why: every plain ``nn.Linear`` outside the task head
becomes dynamic int8 (int8 weights, activations quantized per batch: the
speed-up), and the word-embedding table becomes weight-only int8 (the size:
in a small encoder such as MiniLM it is half of all parameters, so quantizing
the Linear layers alone shrinks the file only about 1.5x). Position and
token-type embeddings are tiny and stay fp32, and so do LayerNorms and the
head (``HEAD_NAMES``): both are a sliver of the compute and of the file, and
they are where rounding errors would reach the predictions most directly.

Format of a quantized folder (no pickle anywhere; a safetensors file plus JSON)::

    config.json            the transformers config: the fp32 architecture to build
    quantized.safetensors  the quantized model's tensors:
                             NAME.weight_int8   int8 [rows, columns]  (quantized module NAME)
                             NAME.weight_scale  float32 [rows]; weight ~= int8 * scale per row
                             NAME.bias          float32 [rows]        (Linear with a bias)
                             every other tensor: the fp32 original under its usual name
    quantization.json      {"format": "tunesmith-int8", "version": 1,
                            "architecture": "BertForSequenceClassification",
                            "modules": {NAME: "linear" | "embedding", ...},
                            "schemes": {kind: how it is quantized, in words}}

Scales are symmetric (no zero points). The weights file is deliberately not
called ``model.safetensors``: transformers must not take it for fp32 weights.
Loading builds the fp32 architecture from ``config.json`` (random init, no
weights read), swaps empty int8 modules in at the listed names and loads the
tensors with ``strict`` checking, so a file that does not fit is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from tunesmith.errors import ModelError
from tunesmith.models.folder_format import (
    build_from_config,
    load_strict,
    read_versioned,
    save_with_manifest,
)
from tunesmith.models.int8_modules import Int8DynamicLinear, Int8Embedding

FORMAT = "tunesmith-int8"
VERSION = 1
WEIGHTS = "quantized.safetensors"
SPEC = "quantization.json"
#: Child-module names of task heads, kept fp32 (classification, QA, LM heads).
HEAD_NAMES = frozenset({"classifier", "score", "qa_outputs", "lm_head"})
SCHEMES = {
    "linear": "int8 weights, symmetric per output row; activations int8 per batch (dynamic)",
    "embedding": "int8 weights, symmetric per vocabulary row; dequantized on lookup",
}

Builder = Callable[[nn.Module], nn.Module]
#: Kind -> int8 module made from the float one (quantizing its weights).
_QUANTIZE: dict[str, Builder] = {
    "linear": Int8DynamicLinear.from_linear,
    "embedding": Int8Embedding.from_embedding,
}
#: Kind -> empty int8 module of the float one's shape (to load saved tensors into).
_EMPTY: dict[str, Builder] = {
    "linear": lambda m: Int8DynamicLinear(m.in_features, m.out_features, m.bias is not None),
    "embedding": lambda m: Int8Embedding(m.num_embeddings, m.embedding_dim, m.padding_idx),
}
_FLOAT_TYPES = {"linear": nn.Linear, "embedding": nn.Embedding}
_INT8_TYPES = {"linear": Int8DynamicLinear, "embedding": Int8Embedding}


def int8_plan(model: nn.Module, keep_fp32: Collection[str] = HEAD_NAMES) -> dict[str, str]:
    """Which modules ``quantize_int8`` replaces: qualified name -> ``linear``/``embedding``.

    Only exact ``nn.Linear`` (subclasses such as attention's
    ``NonDynamicallyQuantizableLinear`` are read through ``.weight`` by their
    owners) and the model's input (word) embeddings; nothing under a child
    named in ``keep_fp32``, nor the output embeddings.
    """
    inputs = _embeddings(model, "get_input_embeddings")
    outputs = _embeddings(model, "get_output_embeddings")
    plan = {}
    for name, module in model.named_modules():
        if not name or module is outputs or any(p in keep_fp32 for p in name.split(".")):
            continue
        if type(module) is nn.Linear:
            plan[name] = "linear"
        elif module is inputs and type(module) is nn.Embedding:
            plan[name] = "embedding"
    return plan


def quantize_int8(model: nn.Module, keep_fp32: Collection[str] = HEAD_NAMES) -> nn.Module:
    """Replace the modules of ``int8_plan`` by int8 ones, in place; returns ``model`` in eval mode.

    Raises:
        ModelError: The model has no Linear layer or embedding that could be quantized.
    """
    plan = int8_plan(model, keep_fp32)
    if not plan:
        raise ModelError(
            f"{type(model).__name__}: no nn.Linear layers or word embeddings to quantize"
        )
    _swap(model, plan, _QUANTIZE)
    return model.eval()


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """The int8 modules of a quantized model: qualified name -> kind."""
    kinds = {cls: kind for kind, cls in _INT8_TYPES.items()}
    return {n: kinds[type(m)] for n, m in model.named_modules() if type(m) in kinds}


def save_quantized(model: nn.Module, folder: str | Path) -> Path:
    """Write ``config.json``, ``quantized.safetensors`` and ``quantization.json`` into ``folder``.

    Tensors that share memory (tied weights) are stored once and tied again on load.

    Raises:
        ModelError: ``model`` holds no int8 modules (quantize it first).
    """
    modules = quantized_modules(model)
    if not modules:
        raise ModelError("save_quantized: the model has no int8 modules; run quantize_int8 first")
    spec = {
        "format": FORMAT,
        "version": VERSION,
        "modules": modules,
        "schemes": {kind: SCHEMES[kind] for kind in sorted(set(modules.values()))},
    }
    return save_with_manifest(model, Path(folder), weights=WEIGHTS, manifest=SPEC, spec=spec)


def is_quantized(folder: str | Path) -> bool:
    """Whether ``folder`` holds a model saved by ``save_quantized``."""
    return (Path(folder) / SPEC).is_file()


def load_quantized(
    folder: str | Path, model_class: Any = None, *, trust_remote_code: bool = False
) -> nn.Module:
    """The int8 model saved in ``folder``, in eval mode (CPU).

    Args:
        folder: A folder written by ``save_quantized``.
        model_class: An ``AutoModelFor*`` or model class to build from ``config.json``;
            None: the recorded architecture, looked up in transformers.
        trust_remote_code: Allow the config's own model code (only for folders you trust).

    Raises:
        ModelError: ``quantization.json`` is missing or of another format, or the
            tensors do not fit the architecture.
    """
    from transformers import AutoConfig

    folder = Path(folder)
    spec = read_spec(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = build_from_config(model_class or _architecture(spec, folder), config, trust_remote_code)
    try:
        _swap(model, spec["modules"], _EMPTY, check=True)
    except ValueError as err:
        raise ModelError(f"{folder / SPEC}: does not fit the architecture ({err})") from None
    return load_strict(model, folder / WEIGHTS, what="int8 model")


def read_spec(folder: Path) -> dict[str, Any]:
    """``quantization.json`` of ``folder``, checked for a format this version reads.

    Raises:
        ModelError: Missing, unreadable, another format or version, or an unknown module kind.
    """
    path = folder / SPEC
    spec = read_versioned(
        path, FORMAT, VERSION, what="quantization manifest", redo="export the int8 model again"
    )
    modules = spec.get("modules")
    if not isinstance(modules, dict) or any(k not in _INT8_TYPES for k in modules.values()):
        raise ModelError(f"{path}: 'modules' must map module names to linear/embedding")
    return spec


def _swap(
    model: nn.Module, plan: Mapping[str, str], build: Mapping[str, Builder], *, check: bool = False
) -> None:
    """Replace each planned module by ``build[kind](module)``.

    ``check``: a plan read from a file, so each name must exist and be of the float type.
    """
    for name, kind in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child, None)
        if check and type(module) is not _FLOAT_TYPES[kind]:
            raise ValueError(
                f"{name} is not an nn.{_FLOAT_TYPES[kind].__name__} in this architecture"
            )
        setattr(parent, child, build[kind](module))


def _embeddings(model: nn.Module, getter: str) -> nn.Module | None:
    try:
        return getattr(model, getter)()
    except (AttributeError, NotImplementedError):
        return None


def _architecture(spec: Mapping[str, Any], folder: Path) -> Any:
    """The transformers class named in the manifest (never code from the folder)."""
    import transformers
    from transformers import PreTrainedModel

    name = str(spec.get("architecture", ""))
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ModelError(
            f"{folder / SPEC}: architecture '{name}' is not a transformers model class; "
            "pass model_class"
        )
    return cls
