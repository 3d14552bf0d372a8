"""Loading base models and tokenizers safely, and initialising new heads.

Every model tunesmith trains comes through here, so the security rules live in
one place: weights only from safetensors unless the user opted in,
``trust_remote_code`` only when configured, and no hub access when offline.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.errors import ModelError

log = logging.getLogger(__name__)

_UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def quiet_transformers() -> None:
    """Silence transformers' own load reports and progress bars; we log what matters."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # peft still calls a renamed transformers property while saving; not the user's concern.
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
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
    if not path.exists():
        looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/")
        if looks_local or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelError(
                f"model not found: {name_or_path} (give a local folder with config.json "
                "and safetensors weights)"
            )
        return  # a hub id; transformers resolves it when online
    if not path.is_dir():
        raise ModelError(f"model path is a file, not a model folder: {name_or_path}")
    if not (path / "config.json").is_file():
        raise ModelError(f"{name_or_path}: not a model folder (no config.json)")
    files = [p.name for p in path.iterdir()]
    has_safe = any(f.endswith((".safetensors", ".safetensors.index.json")) for f in files)
    unsafe = [f for f in files if f.endswith(_UNSAFE_SUFFIXES)]
    if not has_safe and unsafe and not allow_unsafe_weights:
        raise ModelError(
            f"{name_or_path}: weights are only in pickle format ({', '.join(sorted(unsafe))}); "
            "convert them to safetensors or set model.allow_unsafe_weights=true if you trust them"
        )
    if not has_safe and not unsafe:
        raise ModelError(f"{name_or_path}: no weights found (expected model.safetensors)")


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer and make sure it can pad (some decoders ship without a pad token)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"{name_or_path}: cannot load tokenizer ({_first_line(err)})") from err
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise ModelError(f"{name_or_path}: tokenizer has no pad, eos or unk token to pad with")
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
    try:
        model, info = auto_cls.from_pretrained(
            name_or_path,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_unsafe_weights else True,
            output_loading_info=True,
            **kwargs,
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"{name_or_path}: cannot load model ({_first_line(err)})") from err
    missing = sorted(info.get("missing_keys", []))
    if missing:
        init_new_parameters(model, missing)
        log.info("new parameters (Xavier-uniform init): %s", ", ".join(missing))
    return model


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


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
