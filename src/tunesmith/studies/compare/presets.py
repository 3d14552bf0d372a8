"""What each method name of ``tunesmith compare --methods`` changes in the user's config.

Every method keeps the user's data, split, seed, epochs/steps and batch size
(the same budget); only the method section and the learning rate change. The
learning rate is per method because adapters need far larger ones than full
fine-tuning (the table prints it, so the comparison stays honest); ``--set
METHOD:key=value`` changes any of it. ``topN`` (``top2``, ``top3``...) trains
the top N blocks and the head.
"""

from __future__ import annotations

import difflib
import re

from tunesmith.errors import ConfigError

#: LoRA/DoRA on every linear layer of the blocks: on MiniLM + Rotten Tomatoes this
#: came within 2 points of full fine-tuning, where query/value only stayed 2.4 behind.
_ALL_LINEAR = "method.target_modules=[query,key,value,dense]"

#: name -> config overrides (applied after the config file, before the user's --set).
PRESETS: dict[str, list[str]] = {
    "full": ["method.name=full", "optim.lr=5e-5"],
    "lora": ["method.name=lora", "method.r=8", _ALL_LINEAR, "optim.lr=1e-3"],
    "dora": ["method.name=dora", "method.r=8", _ALL_LINEAR, "optim.lr=1e-3"],
    "ia3": ["method.name=ia3", "optim.lr=5e-3"],
    "prefix": ["method.name=prefix", "method.num_virtual_tokens=20", "optim.lr=5e-3"],
    "prompt": ["method.name=prompt", "method.num_virtual_tokens=20", "optim.lr=3e-2"],
    "bottleneck": ["method.name=bottleneck", "method.reduction_factor=16", "optim.lr=1e-3"],
}
_TOP = re.compile(r"top(\d+)")


def known_methods() -> list[str]:
    """Method names ``--methods`` accepts (``topN`` for any N)."""
    return [*PRESETS, "topN"]


def method_overrides(name: str) -> list[str]:
    """The config overrides of method ``name``; unknown names name the nearest known one."""
    if name in PRESETS:
        return list(PRESETS[name])
    top = _TOP.fullmatch(name)
    if top and int(top.group(1)) >= 1:
        return ["method.name=freeze", f"method.train_layers={int(top.group(1))}", "optim.lr=2e-4"]
    near = difflib.get_close_matches(name, [*PRESETS, "top2"], n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    raise ConfigError(
        f"--methods: unknown method '{name}'{hint}; known: {', '.join(known_methods())}"
    )


def parse_methods(text: str) -> list[str]:
    """``full,top2,lora`` -> the names, each checked, duplicates refused."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ConfigError("--methods: give at least one method, e.g. full,top2,lora")
    seen = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"--methods: '{name}' is listed twice")
        seen.add(name)
        method_overrides(name)
    return names


def parse_sets(items: list[str], methods: list[str]) -> dict[str, list[str]]:
    """``--set lora:optim.lr=5e-4`` (repeatable) -> per-method extra overrides."""
    out: dict[str, list[str]] = {name: [] for name in methods}
    for item in items:
        method, sep, override = item.partition(":")
        if not sep or "=" not in override:
            raise ConfigError(f"--set {item!r}: expected METHOD:key=value, e.g. lora:method.r=16")
        if method not in out:
            raise ConfigError(f"--set {item!r}: '{method}' is not one of --methods {methods}")
        out[method].append(override)
    return out
