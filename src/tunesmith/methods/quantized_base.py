"""QLoRA's frozen base: the linear weights held in 4-bit NF4 or int8 (``method.quantize_base``).

Why: the frozen base is most of a LoRA run's weight memory, and LoRA never
changes it, so it can be stored compressed while the adapters train in full
precision on top (Dettmers et al., QLoRA). Only ``nn.Linear`` weights of the
base are quantized: embeddings, norms, biases and the task head stay as they
are (the head trains; the output embeddings may be tied to the input ones).

Backends, per device (measured, see ``benchmarks/qlora_memory.py``):

* CPU: torchao. ``nf4`` swaps each weight for an ``NF4Tensor`` (the format
  torchtune's QLoRA uses: 4-bit NormalFloat, blocks of 64, double-quantized
  scalers); ``int8`` for an ``Int8Tensor`` (weight-only, symmetric per output
  row). Both dequantize inside ``F.linear``, so gradients flow to the input
  (the adapters below) and never to the weight. bitsandbytes' CPU backend is
  not used: on CPUs with native bf16 its 4-bit layer repacks the weight for
  inference at the first evaluation, and training after that fails (in-place
  bias add on a leaf view, no autograd through the packed kernel), and its
  8-bit training path is several times slower than torchao's.
* CUDA: bitsandbytes, the reference implementation (``Linear4bit`` NF4 with
  double quantization and bf16 compute where supported, or ``Linear8bitLt``),
  followed by ``peft.prepare_model_for_kbit_training``.

A checkpoint records the quantization in ``quantized_base.json`` next to the
adapter; loading it (eval, predict, export) quantizes the base again the same
way, so evaluation sees the model that was trained. ``export --merge`` folds
LoRA into the *dequantized* base (``merge_dequantized``): a plain fp32 model
that computes what the QLoRA model computed, not the original base plus update.

Limits: the base is loaded in full precision and then quantized layer by layer,
so the memory peak while loading is the fp32 model's; the saving holds from
then on. On CPU every forward dequantizes each weight, which makes steps slower
than over an fp32 base: QLoRA here buys memory, not speed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

#: The values ``method.quantize_base`` accepts (besides null).
QUANT_KINDS = ("nf4", "int8")
#: Written next to a QLoRA adapter: how its base was quantized during training.
MARKER = "quantized_base.json"
#: NF4 block (elements sharing one scale) and the largest scaler block (double quantization).
_NF4_BLOCK = 64
_NF4_SCALER_BLOCK = 256
_BNB_FLAGS = {"nf4": "is_loaded_in_4bit", "int8": "is_loaded_in_8bit"}
_INSTALL = {
    "torchao": "pip install 'tunesmith[qlora]' (torchao>=0.18)",
    "bitsandbytes": "pip install bitsandbytes",
}


@dataclass
class QuantizedBase:
    """What ``quantize_base`` did: for the run log and the tests."""

    kind: str
    backend: str
    quantized: list[str] = field(default_factory=list)
    #: Linear layers left in full precision, with the reason.
    kept: dict[str, str] = field(default_factory=dict)
    #: Bytes of the quantized layers' weights before and after.
    bytes_before: int = 0
    bytes_after: int = 0


def backend_for(device: torch.device) -> str:
    """The library that quantizes the base on ``device``.

    Raises:
        ConfigError: A device neither backend serves (MPS, XPU, ...).
    """
    if device.type == "cuda":
        return "bitsandbytes"
    if device.type == "cpu":
        return "torchao"
    raise ConfigError(
        f"method.quantize_base: supported on CPU (torchao) and CUDA (bitsandbytes), not on "
        f"{device.type}; set method.quantize_base=null"
    )


def training_device() -> torch.device:
    """The device the run trains on: accelerate's choice for this process."""
    from accelerate import PartialState

    return PartialState().device


def require_backend(backend: str) -> None:
    """Fail with the install command when the backend's library is missing.

    Raises:
        ConfigError: The library cannot be imported.
    """
    try:
        __import__(backend)
    except ImportError:
        raise ConfigError(
            f"method.quantize_base needs {backend} on this device, which is not installed: "
            f"{_INSTALL[backend]}"
        ) from None


def quantize_base(
    model: nn.Module,
    kind: str,
    *,
    keep: Iterable[str] = (),
    only: Iterable[str] | None = None,
    device: torch.device | None = None,
) -> QuantizedBase:
    """Quantize the frozen ``nn.Linear`` weights of ``model`` in place.

    Args:
        model: A plain transformers model (not yet wrapped by peft).
        kind: ``nf4`` or ``int8``.
        keep: Module names left in full precision with everything below them
            (the task head, which trains).
        only: Exactly these modules (a checkpoint's record), instead of every
            linear layer outside ``keep``.
        device: Where the run trains; None: accelerate's device.

    Raises:
        ConfigError: The backend is missing or no linear layer could be quantized.
        ModelError: A module named in ``only`` is not a linear layer of ``model``.
    """
    device = device if device is not None else training_device()
    backend = backend_for(device)
    require_backend(backend)
    report = QuantizedBase(kind, backend)
    skip = set(keep)
    wanted = None if only is None else set(only)
    modules = dict(model.named_modules())
    if wanted is not None:
        missing = sorted(n for n in wanted if type(modules.get(n)) is not nn.Linear)
        if missing:
            raise ModelError(
                f"quantize_base: the checkpoint quantized {missing[0]}, which is not a linear "
                "layer of this base model (the adapter was trained on another base)"
            )
    output = getattr(model, "get_output_embeddings", lambda: None)()
    for name, module in modules.items():
        if type(module) is not nn.Linear or _under(name, skip):
            continue
        if wanted is not None and name not in wanted:
            continue
        if module is output:
            report.kept[name] = "output embeddings (may be tied to the input embeddings)"
            continue
        why = _cannot_quantize(module, kind)
        if why:
            report.kept[name] = why
            continue
        report.bytes_before += storage_bytes(module.weight)
        if backend == "torchao":
            _quantize_torchao(module, kind)
        else:
            module = _bnb_linear(module, kind, device)
            _swap(model, name, module)
        report.bytes_after += storage_bytes(module.weight)
        report.quantized.append(name)
    if not report.quantized:
        raise ConfigError(
            "method.quantize_base: the model has no linear layer to quantize outside the head; "
            "set method.quantize_base=null"
        )
    if backend == "bitsandbytes":
        from peft import prepare_model_for_kbit_training

        # What transformers sets on a bitsandbytes-loaded model: peft then wraps the
        # layers with its bitsandbytes LoRA layers (casting inputs to the adapter dtype).
        setattr(model, _BNB_FLAGS[kind], True)
        # Freezes the base and upcasts any half-precision norm to fp32 for stable training.
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for p in model.parameters():  # quantized weights never train
        if is_quantized(p):
            p.requires_grad_(False)
    log.info(
        "quantize_base: %d linear layers in %s (%s), their weights %.1f -> %.1f MiB%s",
        len(report.quantized),
        kind,
        backend,
        report.bytes_before / 2**20,
        report.bytes_after / 2**20,
        f"; kept in full precision: {', '.join(report.kept)}" if report.kept else "",
    )
    return report


def is_quantized(tensor: Any) -> bool:
    """True for a quantized weight of either backend (NF4/Int8 tensor, bnb params)."""
    kind = type(tensor)
    return kind.__module__.startswith("torchao.") or kind.__name__ in ("Params4bit", "Int8Params")


def dequantized(module: nn.Module) -> torch.Tensor:
    """The full-precision weight a quantized linear layer computes with (fp32).

    Exactly what its forward multiplies by: NF4 and int8 tensors dequantize
    the same way inside ``F.linear``.
    """
    weight = module.weight
    if hasattr(weight, "get_original_weight"):  # torchao NF4
        return weight.get_original_weight().float()
    if type(weight).__module__.startswith("torchao."):
        return weight.dequantize().float()
    if type(weight).__name__ in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(module).float()
    return weight.detach().float()


def dequantize_base(model: nn.Module) -> int:
    """Replace every quantized linear weight by its fp32 dequantization; returns how many.

    Used before merging LoRA into the base: the merged weight is then the
    dequantized base plus the update, so the merged model computes what the
    quantized model computed in training and evaluation.
    """
    count = 0
    for name, module in list(model.named_modules()):
        # Own parameters only: a peft LoRA layer forwards ``.weight`` to its base layer.
        if not is_quantized(dict(module.named_parameters(recurse=False)).get("weight")):
            continue
        weight = dequantized(module)
        if type(module) is nn.Linear:
            module.weight = nn.Parameter(weight, requires_grad=False)
        else:  # a bitsandbytes layer: back to a plain Linear
            plain = nn.Linear(
                weight.shape[1], weight.shape[0], bias=module.bias is not None, device=weight.device
            )
            plain.weight = nn.Parameter(weight, requires_grad=False)
            if module.bias is not None:
                plain.bias = nn.Parameter(module.bias.detach().float(), requires_grad=False)
            _swap(model, name, plain)
        count += 1
    for flag in _BNB_FLAGS.values():  # a plain model again: peft and transformers must know
        if getattr(model, flag, False):
            setattr(model, flag, False)
    return count


def merge_dequantized(peft_model: nn.Module) -> nn.Module:
    """Fold LoRA into the dequantized base: a plain fp32 model equal to the QLoRA model.

    The result computes what the quantized model computed (the base's
    quantization error included), not what the original fp32 base plus the
    update would: evaluation, export and deployment then agree. Each layer's
    update is added by hand (``get_delta_weight``) because peft's own merge of
    a quantized layer re-quantizes the sum.
    """
    from peft.tuners.lora import LoraLayer

    dequantize_base(peft_model.get_base_model())
    with torch.no_grad():
        for module in peft_model.modules():
            if not isinstance(module, LoraLayer):
                continue
            base = module.get_base_layer()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    base.weight += module.get_delta_weight(adapter).to(base.weight.dtype)
    return peft_model.unload()


# -- memory -----------------------------------------------------------------------
def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really holds, counting the inner tensors of a quantized one.

    ``numel() * element_size()`` reports the original dtype's size for tensor
    subclasses (an NF4 weight claims 4 bytes per element); their parts do not.
    """
    flatten = getattr(tensor, "__tensor_flatten__", None)  # only tensor subclasses have it
    if flatten is not None:
        inner = [getattr(tensor, name) for name in flatten()[0]]
        return sum(storage_bytes(t) for t in inner if t is not None)
    quant_state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit: packed + absmax
    extra = 0
    if quant_state is not None:
        extra = sum(storage_bytes(t) for t in _state_tensors(quant_state))
    return tensor.numel() * tensor.element_size() + extra


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters and buffers: quantized weights and everything else."""
    out = {"quantized": 0, "other": 0}
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        out["quantized" if is_quantized(t) else "other"] += storage_bytes(t)
    return out


# -- checkpoints ------------------------------------------------------------------
def write_marker(folder: Path, report: QuantizedBase) -> None:
    """Record how the base was quantized (kind and exact modules), next to the adapter."""
    info = {"quantize_base": report.kind, "backend": report.backend, "modules": report.quantized}
    (Path(folder) / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def read_marker(folder: Path) -> tuple[str, list[str]] | None:
    """``(kind, module names)`` an adapter folder was trained over; None for plain LoRA.

    Raises:
        ModelError: The marker is unreadable or names an unknown quantization.
    """
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text("utf-8"))
        kind, modules = info["quantize_base"], [str(m) for m in info["modules"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    if kind not in QUANT_KINDS:
        known = ", ".join(QUANT_KINDS)
        raise ModelError(f"{path}: unknown quantize_base {kind!r} (known: {known})")
    return kind, modules


# -- backends ---------------------------------------------------------------------
def _quantize_torchao(module: nn.Linear, kind: str) -> None:
    weight = module.weight.detach()
    if kind == "nf4":
        from torchao.quantization import to_nf4

        # Double quantization groups the block scales; the group must divide their count.
        scaler_block = math.gcd(weight.numel() // _NF4_BLOCK, _NF4_SCALER_BLOCK)
        quantized = to_nf4(weight.contiguous(), _NF4_BLOCK, scaler_block)
    else:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        # set_inductor_config=False: the run does not compile, and global inductor
        # settings are not ours to change.
        quantize_(module, Int8WeightOnlyConfig(set_inductor_config=False))
        quantized = module.weight.detach()
    module.weight = nn.Parameter(quantized, requires_grad=False)


def _bnb_linear(module: nn.Linear, kind: str, device: torch.device) -> nn.Module:
    """A bitsandbytes layer holding ``module``'s weight, quantized on the move to ``device``."""
    import bitsandbytes as bnb

    # From the CPU: bitsandbytes quantizes a weight when it moves to the GPU.
    weight = module.weight.detach().float().cpu()
    has_bias = module.bias is not None
    if kind == "nf4":
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        layer = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=has_bias,
            compute_dtype=compute,
            compress_statistics=True,  # double quantization, as in QLoRA
            quant_type="nf4",
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
    else:
        layer = bnb.nn.Linear8bitLt(
            module.in_features, module.out_features, bias=has_bias, has_fp16_weights=False
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(module.bias.detach().float(), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes here


def _cannot_quantize(module: nn.Linear, kind: str) -> str:
    """Why a linear layer stays in full precision, or "" when it can be quantized."""
    if kind == "nf4" and module.weight.numel() % _NF4_BLOCK:
        return f"{module.weight.numel()} weights are not a multiple of the NF4 block {_NF4_BLOCK}"
    return ""


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _under(name: str, roots: set[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _state_tensors(state: Any) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes ``QuantState`` (absmax, code, nested state)."""
    out = [t for t in vars(state).values() if isinstance(t, torch.Tensor) and not is_quantized(t)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        out += _state_tensors(nested)
    return out
