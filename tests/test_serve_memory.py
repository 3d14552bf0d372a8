"""Serving many adapters costs their own weights: the base is held once.

A Llama of hidden size 256 with a rank-128 LoRA on every linear layer (an
adapter of about 4 MB on disk, large enough for resident memory to measure),
loaded under four model ids next to a bottleneck adapter.
"""

from __future__ import annotations

import gc
from pathlib import Path

import psutil
import pytest
import torch

from chat_fixtures import build_tiny_llama, write_jsonl
from serve_fixtures import chat_rows
from tunesmith.api import train
from tunesmith.config.root import Config
from tunesmith.serve.catalog import Catalog
from tunesmith.training.allocator import release_free_memory

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter(model: Path, tmp: Path, name: str, method: dict) -> Path:
    data = write_jsonl(tmp / f"{name}.jsonl", chat_rows("I am a tiny bot.", 16))
    cfg = {
        "model": {"name_or_path": str(model)},
        "task": {"type": "causal_lm"},
        "method": method,
        "data": {"train": str(data), "max_length": 64, "validation_fraction": 0.25},
        "train": {
            "max_steps": 1,
            "batch_size": 4,
            "output_dir": str(tmp / name),
            "precision": "fp32",
        },
    }
    result = train(Config.from_dict(cfg), progress=False)
    return result.final_dir


def _rss() -> int:
    gc.collect()
    release_free_memory()
    return psutil.Process().memory_info().rss


@pytest.mark.skipif(not psutil.LINUX, reason="resident memory is read the Linux way")
def test_each_adapter_costs_its_size_and_the_base_is_stored_once(tmp_path: Path) -> None:
    model = build_tiny_llama(tmp_path / "llama", layers=2)
    _widen(model)
    lora = _adapter(model, tmp_path, "lora", {"name": "lora", "r": 128, "target_modules": TARGETS})
    neck = _adapter(model, tmp_path, "neck", {"name": "bottleneck", "reduction_factor": 4})
    size = (lora / "adapter_model.safetensors").stat().st_size
    assert size > 3e6  # large enough to see in resident memory

    catalog = Catalog()
    catalog.add("a0", lora)  # the base and the LoRA tree are made here
    catalog.add("neck", neck)
    base_bytes = catalog.base_tensors()
    stored = catalog.storage_bytes()
    for i in range(1, 4):
        before = _rss()
        catalog.add(f"a{i}", lora)
        grown = _rss() - before
        assert grown <= 1.5 * size, (
            f"adapter {i}: RSS grew {grown / 1e6:.1f} MB for {size / 1e6:.1f}"
        )
        # The base's storages are the same ones; only the adapter's own tensors are new.
        assert catalog.base_tensors() == base_bytes
        added = catalog.storage_bytes() - stored
        assert 0.9 * size <= added <= 1.1 * size
        stored += added
    body = catalog.get("a0").tree.model.get_base_model().model
    assert catalog.get("neck").tree.model.model.layers[1].mlp.down_proj.weight is (
        body.layers[1].mlp.down_proj.base_layer.weight
    )
    catalog.remove("a3")
    assert "a3" not in catalog.names() and catalog.base_tensors() == base_bytes


def _widen(folder: Path) -> None:
    """Rebuild the tiny Llama at hidden size 256 (same tokenizer), so adapters weigh MBs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(folder)
    config.hidden_size, config.intermediate_size = 256, 512
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
