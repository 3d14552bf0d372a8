"""``tunesmith doctor``: the facts about this machine that decide how to train."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

import torch

from tunesmith.assets.locate import ASSETS, find
from tunesmith.training.precision import cpu_bf16_native, cpu_capability, resolve_precision

PACKAGES = ("torch", "transformers", "accelerate", "peft", "datasets", "safetensors", "pydantic")


def collect() -> dict[str, Any]:
    """Versions, threads, precision support and offline assets, as a flat dict."""
    facts: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    for pkg in PACKAGES:
        try:
            facts[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            facts[pkg] = "not installed"
    facts["cpu_cores"] = os.cpu_count()
    facts["torch_threads"] = torch.get_num_threads()
    facts["cpu_capability"] = cpu_capability()
    facts["cpu_bf16_native"] = cpu_bf16_native()
    facts["cuda"] = torch.cuda.is_available()
    if facts["cuda"]:
        facts["cuda_device"] = torch.cuda.get_device_name(0)
        facts["cuda_bf16"] = torch.cuda.is_bf16_supported()
    facts["precision_auto"] = {"no": "fp32"}.get(p := resolve_precision("auto"), p)
    facts["hf_hub_offline"] = os.environ.get("HF_HUB_OFFLINE", "0") == "1"
    for name, asset in ASSETS.items():
        path = find(asset)
        facts[f"asset/{name}"] = str(path) if path else f"missing: {asset.install_command}"
    return facts


def render(facts: dict[str, Any]) -> str:
    """Aligned ``key  value`` lines."""
    width = max(len(k) for k in facts)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in facts.items())
