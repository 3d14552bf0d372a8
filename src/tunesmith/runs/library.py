"""Per-task adapters on one frozen base: a library folder and a multi-adapter predictor.

Adapters trained with peft methods (lora, dora, ia3, prefix, prompt) against
the same base model are collected in a library folder (one sub-folder per
name). The predictor loads the base once and switches adapters in place:
``peft`` keeps each adapter's weights side by side and ``set_adapter`` picks
one. Task heads may differ between adapters (another label set): each
adapter's head is given its own shape before peft loads its weights.
"""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tunesmith.config.multitask import MULTITASK
from tunesmith.config.root import Config
from tunesmith.errors import ConfigError, ModelError
from tunesmith.methods.base import METHODS
from tunesmith.methods.peft_methods import PeftMethod, adapter_load_errors
from tunesmith.methods.quantized_base import read_marker
from tunesmith.models.folders import read_manifest
from tunesmith.models.loading import (
    check_base_model,
    check_weights,
    checkpoint_manifest,
    load_tokenizer,
    quiet_transformers,
)
from tunesmith.runs.predict import input_records, predict_records
from tunesmith.tasks.base import get_task

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PROMPT_LEARNING = {"prefix", "prompt"}
_SAFETENSORS_ONLY = "the adapter library holds safetensors adapters only; convert them"


class AdapterLibrary:
    """Named adapter checkpoints that share one base model.

    Args:
        root: The library folder (created on the first ``add``).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        """Adapter names, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "tunesmith.json").is_file())

    def info(self) -> list[dict[str, Any]]:
        """Name, method, base model, labels and weight size of every adapter."""
        rows = []
        for name in self.names():
            m = read_manifest(self.root / name)
            rows.append(
                {
                    "name": name,
                    "method": m.get("method"),
                    "task": m.get("task"),
                    "base_model": m.get("base_model"),
                    "labels": m.get("labels"),
                    "weights_mb": m.get("weights_mb"),
                }
            )
        return rows

    def add(self, name: str, checkpoint: str | Path) -> Path:
        """Copy an adapter checkpoint into the library under ``name``.

        Raises:
            ConfigError: Bad or taken name, not a peft adapter checkpoint, or a
                base model / method family different from the library's.
            ModelError: Not a checkpoint folder, pickle-only weights, or its base
                model is missing or no longer the architecture it was trained on.
        """
        if not _NAME.match(name):
            raise ConfigError(f"adapter name '{name}': use letters, digits, '.', '_' or '-'")
        target = self.root / name
        if target.exists():
            raise ConfigError(f"adapter '{name}' already exists in {self.root}; delete it first")
        manifest = checkpoint_manifest(checkpoint)
        method = METHODS.get(manifest["method"])
        if not (method.saves_adapter and issubclass(method, PeftMethod)):
            raise ConfigError(
                f"{checkpoint}: method '{manifest['method']}' is not a peft adapter "
                "(the library holds lora, dora, ia3, prefix or prompt checkpoints)"
            )
        if manifest.get("task") == MULTITASK:
            raise ConfigError(
                f"{checkpoint}: a multi-task checkpoint (one encoder adapter, a head per task) "
                "cannot join the library; predict with it directly"
            )
        recorded = read_marker(Path(checkpoint))
        if recorded is not None:  # the library's shared base is full precision
            raise ConfigError(
                f"{checkpoint}: a QLoRA adapter (method.quantize_base {recorded[0]}) needs its "
                "quantized base, and the library serves one full-precision base; predict with "
                "the checkpoint directly"
            )
        check_weights(Path(checkpoint), hint=_SAFETENSORS_ONLY)
        check_base_model(checkpoint, manifest)
        for other in self.info():
            if other["base_model"] != manifest["base_model"]:
                raise ConfigError(
                    f"{checkpoint}: base model {manifest['base_model']} differs from the "
                    f"library's ({other['base_model']}); adapters must share one base"
                )
            theirs = read_manifest(self.root / other["name"]).get("base_signature")
            ours = manifest.get("base_signature")
            if theirs and ours and theirs != ours:
                changed = ", ".join(k for k in ours if theirs.get(k) != ours[k])
                raise ConfigError(
                    f"{checkpoint}: trained on another version of {manifest['base_model']} "
                    f"than the library's adapter '{other['name']}' (differs in: {changed}); "
                    "adapters must share one base"
                )
            if (other["method"] in _PROMPT_LEARNING) != (manifest["method"] in _PROMPT_LEARNING):
                raise ConfigError(
                    f"{checkpoint}: peft cannot mix prompt-learning adapters (prefix, prompt) "
                    f"with weight adapters ({other['method']}) on one base"
                )
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(checkpoint, target)
        return target

    def delete(self, name: str) -> None:
        """Remove adapter ``name`` from the library."""
        target = self.root / name
        if not (target / "tunesmith.json").is_file():
            raise ConfigError(
                f"no adapter '{name}' in {self.root} (have: {', '.join(self.names())})"
            )
        shutil.rmtree(target)

    def predictor(self) -> MultiAdapterPredictor:
        """A predictor holding the base once with every adapter of the library."""
        names = self.names()
        if not names:
            raise ConfigError(f"adapter library {self.root} is empty; add adapters first")
        return MultiAdapterPredictor({n: self.root / n for n in names})


class MultiAdapterPredictor:
    """One base model in memory, several adapters; ``predict(texts, adapter=...)`` switches.

    Args:
        adapters: Name -> adapter checkpoint folder (all on the same base).
    """

    def __init__(self, adapters: dict[str, Path]) -> None:
        from peft import PeftModel

        quiet_transformers()
        self.folders = dict(adapters)
        self.tasks: dict[str, Any] = {}
        self.labels: dict[str, list[str]] = {}
        self.padding: dict[str, str | None] = {}
        first, *rest = self.folders
        for name, folder in self.folders.items():
            manifest = checkpoint_manifest(folder)
            cfg = Config.from_dict(manifest["config"], source=str(folder / "tunesmith.json"))
            check_weights(folder, hint=_SAFETENSORS_ONLY)
            check_base_model(folder, manifest)
            self.tasks[name] = get_task(cfg)
            self.labels[name] = list(manifest["labels"])
            self.padding[name] = manifest.get("padding_side")
        self.tokenizer = load_tokenizer(str(self.folders[first]))
        base = self.tasks[first].build_model(self.labels[first], self.tokenizer)
        with adapter_load_errors(self.folders[first]):
            self.model = PeftModel.from_pretrained(
                base, str(self.folders[first]), adapter_name=first
            )
        for name in rest:
            with adapter_load_errors(self.folders[name]):
                shape_heads_for(self.model, self.folders[name], name)
                self.model.load_adapter(str(self.folders[name]), adapter_name=name)
        self.model.eval()

    @property
    def names(self) -> list[str]:
        """The adapters held."""
        return list(self.folders)

    def predict(
        self,
        texts: list[str] | None = None,
        *,
        adapter: str,
        input_path: str | None = None,
        batch_size: int = 64,
    ) -> list[dict[str, Any]]:
        """Predictions of adapter ``adapter`` (switched in place, the base is not reloaded)."""

        if adapter not in self.folders:
            raise ConfigError(f"no adapter '{adapter}' (have: {', '.join(self.folders)})")
        self.model.set_adapter(adapter)
        self.tokenizer.padding_side = self.padding[adapter] or self.tokenizer.padding_side
        task = self.tasks[adapter]
        records = input_records(task, texts, input_path)
        rows = predict_records(
            self.model, task, self.tokenizer, self.labels[adapter], records, batch_size
        )
        return [{"adapter": adapter, **row} for row in rows]


def saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the adapter checkpoint in ``folder`` (none read)."""
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise ModelError(f"{folder}: adapter_model.safetensors missing")
    with safe_open(str(path), framework="pt") as fh:
        return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118


def shape_heads_for(model: Any, folder: Path, name: str) -> None:
    """Give adapter ``name`` head modules shaped like its saved head (its own label count).

    peft copies the base's head for every new adapter and then refuses weights
    of another shape; a copy with the saved shapes, created first, is kept.
    """
    from peft.utils.other import ModulesToSaveWrapper

    shapes = saved_shapes(folder)
    for path, module in model.named_modules():
        if not isinstance(module, ModulesToSaveWrapper):
            continue
        head = copy.deepcopy(module.original_module)
        for pname, param in head.named_parameters():
            saved = shapes.get(f"{path}.{pname}")
            if saved is not None and tuple(param.shape) != saved:
                param.data = torch.empty(saved, dtype=param.dtype)
        module.modules_to_save[name] = head


def describe(rows: list[dict[str, Any]]) -> str:
    """A readable listing of ``AdapterLibrary.info()``."""
    if not rows:
        return "(no adapters)"
    lines = [
        f"{r['name']:<20}{r['method']:<8}{r['task']:<26}{r['weights_mb'] or 0:>8.2f} MB  "
        f"labels: {', '.join(r['labels'] or [])}"
        for r in rows
    ]
    lines.append(f"base model: {rows[0]['base_model']}")
    return "\n".join(lines)
