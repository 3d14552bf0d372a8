"""Safe loading: no pickle is unpickled and no model code runs unless the config opts in.

Pickles (``.bin``/``.pt``) can run code when unpickled, so wherever a path to
weights is accepted a pickle is refused with one line that names the file and
the opt-in ``model.allow_unsafe_weights``. With the opt-in, pickles are read
only through ``torch.load(weights_only=True)``, which refuses anything but
tensors. ``trust_remote_code`` is passed as False unless configured.

Every "malicious" pickle here would create a marker file when unpickled; the
tests check that it never appears.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config, toy_rows, write_csv
from helpers import cli_fails, write_config
from tunesmith.cli import main

FLAG = "model.allow_unsafe_weights"


class RunsCode:
    """Unpickling this creates ``path``: a stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.path),))


def write_pickle(path: Path, tensors: dict[str, torch.Tensor], marker: Path | None) -> Path:
    """``torch.save`` the tensors, plus an object that runs code when a marker is given."""
    torch.save({**tensors, **({"payload": RunsCode(marker)} if marker else {})}, path)
    return path


def pickled_model(tiny_bert: Path, folder: Path, marker: Path | None = None) -> Path:
    """The tiny BERT with its weights as ``pytorch_model.bin`` only."""
    shutil.copytree(tiny_bert, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    write_pickle(folder / "pytorch_model.bin", load_file(tiny_bert / "model.safetensors"), marker)
    return folder


def pickled_adapter(checkpoint: Path, folder: Path, marker: Path | None = None) -> Path:
    """A copy of an adapter checkpoint whose weights are ``adapter_model.bin`` only."""
    shutil.copytree(checkpoint, folder)
    weights = folder / "adapter_model.safetensors"
    write_pickle(folder / "adapter_model.bin", load_file(weights), marker)
    weights.unlink()
    return folder


def allow_unsafe_in_manifest(checkpoint: Path) -> None:
    """Set the opt-in in the checkpoint's recorded config (what eval/predict read)."""
    path = checkpoint / "tunesmith.json"
    manifest = json.loads(path.read_text())
    manifest["config"]["model"]["allow_unsafe_weights"] = True
    path.write_text(json.dumps(manifest))


@pytest.fixture
def base(tiny_bert: Path, tmp_path: Path) -> dict:
    data = write_csv(tmp_path / "train.csv", toy_rows(40))
    return tiny_config(tiny_bert, data, tmp_path / "run", train={"epochs": 1})


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    """Created by any unpickled payload; must never exist."""
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "a pickle was unpickled without weights_only"


@pytest.mark.parametrize(
    "where", ["model-folder", "model-file", "checkpoint-file", "adapter-file", "adapter-folder"]
)
def test_pickles_are_refused_without_the_opt_in(
    capsys, tmp_path, base, tiny_bert, tiny_runs, marker, where: str
) -> None:
    weights = write_pickle(tmp_path / "weights.pt", {"w": torch.zeros(2)}, marker)
    if where == "model-folder":
        base["model"]["name_or_path"] = str(pickled_model(tiny_bert, tmp_path / "m", marker))
        args, named = ["train", str(write_config(tmp_path, base))], "pytorch_model.bin"
    elif where == "model-file":
        base["model"]["name_or_path"] = str(weights)
        args, named = ["train", str(write_config(tmp_path, base))], "weights.pt"
    elif where == "checkpoint-file":
        args, named = ["predict", str(weights), "--text", "fine"], "weights.pt"
    elif where == "adapter-file":
        args = ["adapters", "add", "a", str(weights), "--library", str(tmp_path / "lib")]
        named = "weights.pt"
    else:
        adapter = pickled_adapter(tiny_runs["lora"], tmp_path / "lora", marker)
        args, named = ["predict", str(adapter), "--text", "fine"], "adapter_model.bin"
    cli_fails(capsys, args, named, FLAG)


def test_the_adapter_library_holds_safetensors_only(capsys, tmp_path, tiny_runs, marker):
    adapter = pickled_adapter(tiny_runs["lora"], tmp_path / "lora", marker)
    library = ["--library", str(tmp_path / "lib")]
    args = ["adapters", "add", "a", str(adapter), *library]
    cli_fails(capsys, args, "adapter_model.bin", "safetensors adapters only")


@pytest.fixture
def torch_loads(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of every ``torch.load`` call (transformers' and peft's)."""
    calls: list[dict[str, Any]] = []
    original = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def opted_in_args(where: str, tmp_path: Path, base: dict, tiny_bert: Path, tiny_runs, marker):
    """CLI arguments loading opted-in pickles: a base model (train) or an adapter (predict)."""
    if where == "base-model":
        base["model"].update(
            name_or_path=str(pickled_model(tiny_bert, tmp_path / "m", marker)),
            allow_unsafe_weights=True,
        )
        return ["train", str(write_config(tmp_path, base)), "--no-progress"]
    adapter = pickled_adapter(tiny_runs["lora"], tmp_path / "lora", marker)
    return ["predict", str(adapter), "--text", "fine", "--allow-unsafe-weights"]


def test_a_checkpoint_cannot_grant_itself_permissions(capsys, tmp_path, tiny_runs) -> None:
    """Opt-ins written into a received checkpoint's manifest are ignored."""
    adapter = pickled_adapter(tiny_runs["lora"], tmp_path / "lora")
    allow_unsafe_in_manifest(adapter)
    manifest = json.loads((adapter / "tunesmith.json").read_text())
    manifest["config"]["model"]["trust_remote_code"] = True
    (adapter / "tunesmith.json").write_text(json.dumps(manifest))
    cli_fails(capsys, ["predict", str(adapter), "--text", "fine"], "adapter_model.bin", FLAG)


@pytest.mark.parametrize("where", ["base-model", "adapter"])
def test_opted_in_pickles_load_only_through_weights_only(
    tmp_path, base, tiny_bert, tiny_runs, torch_loads, where: str
) -> None:
    assert main(opted_in_args(where, tmp_path, base, tiny_bert, tiny_runs, None)) == 0
    assert torch_loads, "the pickle was loaded"
    assert all(call.get("weights_only") is True for call in torch_loads), torch_loads


@pytest.mark.parametrize("where", ["base-model", "adapter"])
def test_opted_in_pickles_that_run_code_are_refused(
    capsys, tmp_path, base, tiny_bert, tiny_runs, marker, where: str
) -> None:
    args = opted_in_args(where, tmp_path, base, tiny_bert, tiny_runs, marker)
    cli_fails(capsys, args, "refused to unpickle the weights", "mkdir")


# -- trust_remote_code ----------------------------------------------------------


@pytest.fixture
def from_pretrained_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Keyword arguments of every tokenizer and model ``from_pretrained`` call we make."""
    import peft
    import transformers

    calls: list[dict[str, Any]] = []
    for cls in (
        transformers.AutoTokenizer,
        transformers.AutoModelForSequenceClassification,
        peft.PeftModel,
    ):
        original = cls.from_pretrained

        def spy(*args: Any, _original: Any = original, _name: str = cls.__name__, **kwargs: Any):
            calls.append({"class": _name, **kwargs})
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


def test_remote_code_is_never_trusted_by_default(tmp_path, base, from_pretrained_calls) -> None:
    base["method"] = {"name": "lora"}
    assert main(["train", str(write_config(tmp_path, base)), "--no-progress"]) == 0
    best = Path(base["train"]["output_dir"]) / "best"
    assert main(["predict", str(best), "--text", "fine"]) == 0  # adapter on its base
    loads = [c for c in from_pretrained_calls if c["class"] != "PeftModel"]
    assert {c["class"] for c in from_pretrained_calls} == {
        "AutoTokenizer",
        "AutoModelForSequenceClassification",
        "PeftModel",
    }
    assert all(c["trust_remote_code"] is False for c in loads), loads
    models = [c for c in loads if c["class"] != "AutoTokenizer"]
    assert all(c["use_safetensors"] is True for c in models), models


def test_a_folder_that_needs_its_own_code_is_refused(capsys, tmp_path, base, tiny_bert, marker):
    folder = shutil.copytree(tiny_bert, tmp_path / "custom")
    (folder / "custom.py").write_text(
        f"import os\nos.mkdir({str(marker)!r})\n"
        "from transformers import BertConfig, BertForSequenceClassification\n"
        "class CustomConfig(BertConfig):\n    model_type = 'custom'\n"
        "class CustomModel(BertForSequenceClassification):\n    config_class = CustomConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "custom"
    config["auto_map"] = {
        "AutoConfig": "custom.CustomConfig",
        "AutoModelForSequenceClassification": "custom.CustomModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    base["model"]["name_or_path"] = str(folder)
    args = ["train", str(write_config(tmp_path, base))]
    cli_fails(capsys, args, "custom code", "set model.trust_remote_code=true only if you trust")
