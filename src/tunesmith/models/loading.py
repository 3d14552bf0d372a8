"""Loading base models and tokenizers safely, and initialising new heads.

Every model tunesmith trains comes through here, so the security rules live in
one place: weights only from safetensors unless the user opted in,
``trust_remote_code`` only when configured, and no hub access when offline.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from tunesmith.core import paths
from tunesmith.errors import ModelError
from tunesmith.models.folders import MANIFEST, read_manifest

log = logging.getLogger(__name__)

#: What marks a folder holding a peft adapter rather than a whole model.
ADAPTER_CONFIG = "adapter_config.json"

_UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_UNSAFE_HINT = (
    "convert them to safetensors, or set model.allow_unsafe_weights=true if you trust them "
    "(they are then read with torch.load(weights_only=True))"
)
_REMOTE_CODE_HINT = "set model.trust_remote_code=true only if you trust the code in that folder"
#: A tokenizer folder has a file named like one of these (tokenizer.json, vocab.txt, spm.model).
_TOKENIZER_PREFIXES = ("tokenizer", "vocab", "merges", "spiece", "sentencepiece", "spm", "bpe")
#: ``config.json`` keys that fix a model's architecture and tensor shapes: an adapter
#: trained on one base only fits a base with the same values.
_ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "n_embd",
    "d_model",
    "dim",
    "num_hidden_layers",
    "n_layer",
    "n_layers",
    "num_layers",
    "num_attention_heads",
    "n_head",
    "n_heads",
    "num_heads",
    "num_key_value_heads",
    "intermediate_size",
    "hidden_dim",
    "n_inner",
    "d_ff",
    "vocab_size",
)
#: Model types whose position ids start after the padding index (usable = table - pad - 1).
_OFFSET_POSITIONS = frozenset(
    {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer"}
)


def quiet_transformers() -> None:
    """Silence transformers' own load reports and progress bars; we log what matters."""
    import warnings

    # Import-time notices of the optional QLoRA libraries (transformers and peft import them
    # when installed) about kernels for hardware this process does not use (CUDA mxfp8, CPU
    # bf16 gemm). Set before the first import of transformers.
    for name in ("torchao", "bitsandbytes", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # peft still calls a renamed transformers property while saving; not the user's concern.
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    # QLoRA (method.quantize_base): peft warns that its int8 LoRA layer cannot merge; tunesmith
    # merges into the dequantized base itself (methods.quantized_base.merge_dequantized).
    warnings.filterwarnings(
        "ignore", message="TorchaoLoraLinear was instantiated without", category=UserWarning
    )


def check_model_source(name_or_path: str, *, allow_unsafe_weights: bool = False) -> None:
    """Fail early, with one clear line, on a path that cannot be a usable model.

    Args:
        name_or_path: Local folder (or hub id when online).
        allow_unsafe_weights: Accept pickle-based weights (``.bin``/``.pt``).

    Raises:
        ModelError: The folder is missing, has no ``config.json``, or only has
            pickle weights while unsafe weights are not allowed.
    """
    path = Path(name_or_path).expanduser()
    if not paths.exists(path):
        looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/")
        if looks_local or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelError(
                f"model not found: {name_or_path} (give a local folder with config.json "
                "and safetensors weights)"
            )
        return  # a hub id; transformers resolves it when online
    if not path.is_dir():
        _refuse_pickle_file(
            path,
            name_or_path,
            "a model folder; give the folder with config.json and model.safetensors",
        )
        raise ModelError(f"model path is a file, not a model folder: {name_or_path}")
    base = adapter_base(path)
    if base is not None:  # a peft adapter (an SFT run's best/): merged into its base on loading
        check_weights(path, allow_unsafe_weights=allow_unsafe_weights)
        check_model_source(base, allow_unsafe_weights=allow_unsafe_weights)
        return
    if not (path / "config.json").is_file():
        raise ModelError(f"{name_or_path}: not a model folder (no config.json)")
    if not check_weights(path, allow_unsafe_weights=allow_unsafe_weights):
        raise ModelError(f"{name_or_path}: no weights found (expected model.safetensors)")


def adapter_base(folder: str | Path) -> str | None:
    """The base model of the peft adapter in ``folder``, or None when it holds no adapter.

    Raises:
        ModelError: The adapter names no base model.
    """
    config = Path(folder) / ADAPTER_CONFIG
    if not config.is_file():
        return None
    base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{folder}: {ADAPTER_CONFIG} names no base_model_name_or_path")
    return str(base)


def check_weights(
    folder: Path, *, allow_unsafe_weights: bool = False, hint: str = _UNSAFE_HINT
) -> bool:
    """Refuse a folder whose weights are only pickles; True when it holds weights at all.

    Raises:
        ModelError: Only pickle weights (``.bin``/``.pt``), naming them and (in
            the default ``hint``) the opt-in ``model.allow_unsafe_weights``.
    """
    files = [p.name for p in Path(folder).iterdir()]
    has_safe = any(f.endswith((".safetensors", ".safetensors.index.json")) for f in files)
    unsafe = sorted(f for f in files if f.lower().endswith(_UNSAFE_SUFFIXES))
    if not has_safe and unsafe and not allow_unsafe_weights:
        raise ModelError(
            f"{folder}: weights are only in pickle format ({', '.join(unsafe)}); {hint}"
        )
    return has_safe or bool(unsafe)


def read_model_config(name_or_path: str | Path) -> dict[str, Any] | None:
    """The ``config.json`` of a local model folder, or None (hub id, no or bad file)."""
    try:
        data = json.loads((Path(name_or_path).expanduser() / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def max_positions(config: Mapping[str, Any]) -> int | None:
    """Longest input (in tokens) the model's position table allows, or None if unbounded."""
    for key in ("max_position_embeddings", "n_positions"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if config.get("model_type") in _OFFSET_POSITIONS:
                pad = config.get("pad_token_id")
                value -= (pad if isinstance(pad, int) else 1) + 1
            return value if value > 0 else None
    return None


def base_signature(name_or_path: str) -> dict[str, Any] | None:
    """The architecture keys of a local base model's config.json (None when not local)."""
    config = read_model_config(name_or_path)
    if config is None:
        return None
    return {key: config[key] for key in _ARCH_KEYS if key in config}


def check_base_model(checkpoint: str | Path, manifest: Mapping[str, Any]) -> None:
    """An adapter checkpoint's base model must exist and have the architecture it was trained on.

    Raises:
        ModelError: The base is missing or unusable, or its ``config.json`` differs
            from the one recorded at training time (another architecture or size).
    """
    model = manifest["config"].get("model", {})
    base = str(manifest.get("base_model") or model.get("name_or_path"))
    try:
        check_model_source(base, allow_unsafe_weights=bool(model.get("allow_unsafe_weights")))
    except ModelError as err:
        raise ModelError(
            f"{checkpoint}: an adapter checkpoint needs the base model it was trained on, "
            f"and that is unusable: {err}"
        ) from None
    expected, actual = manifest.get("base_signature"), base_signature(base)
    if not expected or actual is None:
        return  # written before signatures were recorded, or a hub id
    changed = [key for key in expected if actual.get(key) != expected[key]]
    if "model_type" in changed:  # another architecture: its other keys say nothing more
        changed = ["model_type"]
    if changed:
        diffs = ", ".join(f"{k} {expected[k]} -> {actual.get(k, '(none)')}" for k in changed)
        raise ModelError(
            f"{checkpoint}: trained on a different base model than {base} holds now ({diffs}); "
            "put the original base model back at that path, or train the adapter again"
        )


def checkpoint_manifest(checkpoint: str | Path) -> dict[str, Any]:
    """The ``tunesmith.json`` of a checkpoint folder, with one clear error for anything else.

    Raises:
        ModelError: The path is missing, a file (a pickle is named as such: it is
            never unpickled), a folder without a manifest, or the manifest is broken.
    """
    path = Path(checkpoint)
    if not paths.exists(path):
        raise ModelError(f"checkpoint not found: {checkpoint}")
    if not path.is_dir():
        _refuse_pickle_file(
            path,
            checkpoint,
            "a checkpoint folder; tunesmith never "
            "unpickles a file given as a checkpoint (give a best/ or final/ folder)",
        )
        raise ModelError(f"{checkpoint}: a file, not a checkpoint folder (give best/ or final/)")
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"{path / MANIFEST}: unreadable ({first_line(err)})") from None
    if not manifest:
        raise ModelError(f"{checkpoint}: not a tunesmith checkpoint (no {MANIFEST})")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise ModelError(f"{path / MANIFEST}: not a tunesmith manifest (no 'config' section)")
    return manifest


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer and make sure it can pad (some decoders ship without a pad token).

    Its ``model_max_length`` is capped at the model's position table (from the
    folder's ``config.json``), so truncation never yields inputs the model cannot embed.
    """
    from transformers import AutoTokenizer

    folder = Path(name_or_path).expanduser()
    if paths.is_dir(folder) and not any(
        f.name.startswith(_TOKENIZER_PREFIXES) or f.suffix == ".model" for f in folder.iterdir()
    ):
        raise ModelError(
            f"{name_or_path}: no tokenizer files (such as tokenizer.json or vocab.txt); "
            "save the tokenizer into the model folder (tokenizer.save_pretrained)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelError(
            f"{name_or_path}: cannot load tokenizer ({first_line(err)}){_remote_hint(err)}"
        ) from err
    except Exception as err:
        if type(err) is not Exception:  # the Rust tokenizers library raises plain Exception
            raise
        raise ModelError(f"{name_or_path}: cannot load tokenizer ({first_line(err)})") from err
    positions = max_positions(read_model_config(name_or_path) or {})
    if positions is not None and positions < getattr(tok, "model_max_length", positions + 1):
        tok.model_max_length = positions
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise ModelError(
                f"{name_or_path}: tokenizer has no pad, eos or unk token to pad with; add one "
                "(tokenizer.add_special_tokens({'pad_token': ...})) and save the tokenizer"
            )
        tok.pad_token = fallback
        log.info("tokenizer has no pad token; padding with %r", fallback)
    return tok


def load_pretrained(
    auto_cls: Any,
    name_or_path: str,
    *,
    trust_remote_code: bool = False,
    allow_unsafe_weights: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """``auto_cls.from_pretrained`` with our safety rules; new weights get Xavier init.

    Parameters that the checkpoint lacks (the new task head) are re-initialised
    Xavier-uniform (biases zero) so the head starts the same way for every
    architecture, and their names are logged.
    """
    check_model_source(name_or_path, allow_unsafe_weights=allow_unsafe_weights)
    # Pickles only when the user opted in, and then only plain tensors (weights_only).
    safety = {"weights_only": True} if allow_unsafe_weights else {"use_safetensors": True}
    try:
        model, info = auto_cls.from_pretrained(
            name_or_path,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            **safety,
            **kwargs,
        )
    except pickle.UnpicklingError as err:
        raise unpickling_refused(name_or_path, err) from err
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise ModelError(
            f"{name_or_path}: cannot load model ({first_line(err)}){_remote_hint(err)}"
        ) from err
    except RuntimeError as err:
        if not _is_shape_mismatch(err):
            raise
        raise ModelError(
            f"{name_or_path}: the weights do not fit the model its config.json describes "
            "(tensor shapes differ); config.json and the weights come from different models"
        ) from err
    missing = sorted(info.get("missing_keys", [])) + _mismatched_head(model, info, name_or_path)
    if missing:
        init_new_parameters(model, missing)
        log.info("new parameters (Xavier-uniform init): %s", ", ".join(missing))
    # Regularisers toward the pretrained weights (L2-SP) leave these out.
    model.tunesmith_new_parameters = tuple(missing)
    return model


def _mismatched_head(model: nn.Module, info: Mapping[str, Any], name_or_path: str) -> list[str]:
    """Head weights whose saved shape differs (another label count): re-initialised as new.

    Only asked for by ``Task.load_with_head`` (``ignore_mismatched_sizes``), so a model
    fine-tuned for one task can start another. A mismatch inside the base model still
    means config.json and the weights disagree.

    Raises:
        ModelError: A mismatched weight belongs to the base model.
    """
    keys = sorted(str(m[0]) for m in info.get("mismatched_keys", ()) or ())
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    if any(k.startswith(prefix) for k in keys) and prefix != ".":
        raise ModelError(
            f"{name_or_path}: the weights do not fit the model its config.json describes "
            "(tensor shapes differ); config.json and the weights come from different models"
        )
    if keys:
        log.info("head of %s has another label count: re-initialised", name_or_path)
    return keys


def init_new_parameters(model: nn.Module, names: Iterable[str]) -> None:
    """Xavier-uniform init for the Linear layers owning ``names``; zero their biases."""
    modules = dict(model.named_modules())
    owners = {name.rsplit(".", 1)[0] for name in names if "." in name}
    with torch.no_grad():
        for owner in sorted(owners):
            module = modules.get(owner)
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (``train.gradient_checkpointing``).

    Trades ~30% more compute for activation memory that no longer grows with
    the number of blocks. The non-reentrant variant is used: it needs no
    ``requires_grad`` inputs, so frozen embeddings and adapters work unchanged.

    Raises:
        ModelError: The model's class does not support it.
    """
    enable = getattr(model, "gradient_checkpointing_enable", None)
    try:
        if enable is None:
            raise ValueError("no gradient_checkpointing_enable method")
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except ValueError as exc:
        raise ModelError(
            f"train.gradient_checkpointing: {type(model).__name__} does not support it "
            f"({first_line(exc)}); set it to false"
        ) from None


def unpickling_refused(where: str | Path, err: BaseException) -> ModelError:
    """The error for a pickle that ``torch.load(weights_only=True)`` refused to load."""
    found = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
    what = f" ({found[0]})" if found else ""
    return ModelError(
        f"{where}: refused to unpickle the weights: they hold more than plain tensors{what}, "
        "and loading them could run code; use safetensors weights"
    )


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _remote_hint(err: BaseException) -> str:
    """Point at the config key when transformers refused to run a folder's own code."""
    text = str(err)
    return f"; {_REMOTE_CODE_HINT}" if "trust_remote_code" in text or "custom code" in text else ""


def _is_shape_mismatch(err: RuntimeError) -> bool:
    text = str(err)
    return "size mismatch" in text or "ignore_mismatched_sizes" in text


def _refuse_pickle_file(path: Path, given: Any, wanted: str) -> None:
    """A pickle file given where a folder belongs: refused by name, never unpickled.

    Raises:
        ModelError: ``path`` ends like a pickle (``.bin``/``.pt``/...).
    """
    if path.name.lower().endswith(_UNSAFE_SUFFIXES):
        raise ModelError(
            f"{given}: a pickle file, not {wanted}; pickled .bin/.pt weights inside a model "
            "folder load only with model.allow_unsafe_weights=true"
        )
