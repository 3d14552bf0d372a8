"""``tunesmith export``: merged LoRA/DoRA/IA3 models, unmergeable methods, the CLI.

Each adapter run trains one epoch (a single evaluation, so ``best/`` holds the
weights the model ends with) at a high learning rate, so LoRA B is far from
zero and merging really changes the base weights. The model in memory, the
checkpoint reloaded by tunesmith and the merged folder loaded by plain
transformers must give the same logits.
"""

from __future__ import annotations

import filecmp
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import tunesmith.runs.train as api
from conftest import tiny_config, toy_rows, write_csv
from helpers import PEFT_TEST_MARKS
from tunesmith.api import TrainResult, load_checkpoint, predict, train
from tunesmith.cli import main
from tunesmith.config.root import Config
from tunesmith.deploy.export import export
from tunesmith.errors import ConfigError, ModelError
from tunesmith.models.folders import read_manifest
from tunesmith.training.loop import Trainer

TEXTS = ["the film was superb and fun and lovely", "a dull boring story", "poor", "it was great"]
MERGEABLE = ["lora", "dora", "ia3"]
#: Module name suffixes each method adapts on BERT by default.
TARGETS = {
    "lora": ("attention.self.query", "attention.self.value"),
    "dora": ("attention.self.query", "attention.self.value"),
    "ia3": ("attention.self.key", "attention.self.value", "output.dense"),
}
ADAPTER_MARKS = ("lora", "ia3", "base_layer", "modules_to_save", "original_module", "base_model")

pytestmark = PEFT_TEST_MARKS


@dataclass
class Run:
    result: TrainResult
    #: The trained model object itself, in eval mode (what best/ and final/ hold).
    model: nn.Module

    @property
    def best(self) -> Path:
        assert self.result.best_dir is not None
        return self.result.best_dir


@pytest.fixture(scope="module")
def runs(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Run]:
    """``runs(method)``: trained once per module on the tiny BERT."""
    tmp = tmp_path_factory.mktemp("export-runs")
    data = write_csv(tmp / "toy.csv", toy_rows(48))
    cache: dict[str, Run] = {}

    def get(method: str) -> Run:
        if method not in cache:
            # Adapters: 3 steps, evaluated once at the end. Others: the folder type matters.
            length = {"epochs": 1} if method in MERGEABLE else {"max_steps": 1}
            cfg = tiny_config(
                tiny_bert,
                data,
                tmp / method,
                method={"name": method},
                optim={"lr": 1e-2},
                train={**length, "precision": "fp32"},
            )
            captured: dict[str, Any] = {}

            class Spy(Trainer):
                @classmethod
                def for_method(cls, cfg, task, model, *args, **kwargs):
                    captured["model"] = model
                    return super().for_method(cfg, task, model, *args, **kwargs)

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(api, "Trainer", Spy)
                result = train(Config.from_dict(cfg), progress=False)
            assert result.best_dir is not None and result.loop.steps > 0
            cache[method] = Run(result, captured["model"].eval())
        return cache[method]

    return get


def batch(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer(TEXTS, padding=True, return_tensors="pt")


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


def folder_files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.iterdir()}


# -- merged == unmerged == reloaded ----------------------------------------------------------
@pytest.mark.parametrize("method", MERGEABLE)
def test_merged_equals_unmerged_equals_reloaded(method, runs, tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    run = runs(method)
    adapter = load_file(run.best / "adapter_model.safetensors")
    if method in ("lora", "dora"):
        b = [k for k in adapter if ".lora_B." in k]
        assert b and all(torch.count_nonzero(adapter[k]) > 0 for k in b), "LoRA B still zero"
    inputs = batch(run.best)
    in_memory = logits(run.model, inputs)
    reloaded = logits(load_checkpoint(run.best)[2], inputs)

    out = export(run.best, tmp_path / "merged", merge=True)
    assert out == tmp_path / "merged"
    files = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tunesmith.json"} <= files
    assert not [f for f in files if "adapter" in f], files
    assert not list(out.glob("*.tmp")) and not list(tmp_path.glob("*.tmp"))
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(merged).__name__ == "BertForSequenceClassification"
    plain = logits(merged, inputs)

    torch.testing.assert_close(reloaded, in_memory, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, in_memory, atol=1e-5, rtol=0)
    assert not torch.allclose(in_memory[0], in_memory[1], atol=1e-4), "inputs give one output"

    # The merged folder is a plain BERT classifier: base names plus the head, nothing else.
    weights = load_file(out / "model.safetensors")
    base = load_file(tiny_bert / "model.safetensors")
    assert set(weights) == {"bert." + k for k in base} | {"classifier.weight", "classifier.bias"}
    assert not [k for k in weights if any(m in k for m in ADAPTER_MARKS)]
    # The update was folded into the targeted projections and nowhere else.
    for key, value in base.items():
        module = key.rsplit(".", 1)[0]
        if any(module.endswith(t) for t in TARGETS[method]):
            if key.endswith(".weight"):
                assert not torch.equal(weights["bert." + key], value), f"{key}: nothing merged"
        else:
            assert torch.equal(weights["bert." + key], value), f"{key} changed by the merge"
    head = {k.rsplit("classifier.", 1)[1]: v for k, v in adapter.items() if "classifier." in k}
    assert set(head) == {"weight", "bias"}
    for name, value in head.items():
        assert torch.equal(weights[f"classifier.{name}"], value), "the trained head was not kept"

    manifest = read_manifest(out)
    assert manifest["method"] == "full" and manifest["adapter"] is False
    assert manifest["merged_from"] == method
    assert manifest["labels"] == ["neg", "pos"]
    # tunesmith itself loads the merged folder as a full fine-tune and predicts the same.
    cfg, _task, _model, _tok, labels = load_checkpoint(out)
    assert cfg.method.name == "full"
    rows = predict(out, TEXTS)
    probs = torch.tensor([[r["probabilities"][lab] for lab in labels] for r in rows])
    torch.testing.assert_close(probs, in_memory.softmax(-1), atol=1e-5, rtol=0)
    # The source checkpoint is left as it was.
    assert (run.best / "adapter_model.safetensors").is_file()


# -- what cannot be merged, and what needs no merge ----------------------------------------
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prefix_and_prompt_refuse_merge_and_export_as_a_copy(method, runs, tmp_path):
    best = runs(method).best
    target = tmp_path / "merged"
    with pytest.raises(ConfigError) as info:
        export(best, target, merge=True)
    message = str(info.value)
    assert f"method '{method}' cannot be merged" in message
    assert "virtual tokens" in message  # why
    assert "without --merge" in message  # what to do instead
    assert "\n" not in message
    assert not target.exists(), "a refused export leaves nothing behind"

    out = export(best, tmp_path / "copy")
    assert out == tmp_path / "copy"
    assert folder_files(out) == folder_files(best)
    assert (out / "adapter_model.safetensors").is_file()
    assert predict(out, TEXTS) == predict(best, TEXTS)


@pytest.mark.parametrize("merge", [False, True])
def test_export_refuses_an_existing_folder(merge, runs, tmp_path):
    best = runs("lora").best
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        export(best, target, merge=merge)
    assert folder_files(target) == {"keep.txt": b"mine"}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        export(best, empty, merge=merge)


def test_export_of_a_full_fine_tune_with_merge_copies_the_plain_folder(runs, tmp_path):
    from transformers import AutoModelForSequenceClassification

    best = runs("full").best
    assert (best / "model.safetensors").is_file()
    out = export(best, tmp_path / "out", merge=True)
    assert folder_files(out) == folder_files(best)
    assert not [f for f in out.iterdir() if "adapter" in f.name]
    inputs = batch(out)
    plain = logits(AutoModelForSequenceClassification.from_pretrained(out), inputs)
    source = logits(AutoModelForSequenceClassification.from_pretrained(best), inputs)
    assert torch.equal(plain, source)


def test_export_of_a_folder_that_is_no_checkpoint(tmp_path, tiny_bert):
    with pytest.raises(ModelError, match="not a tunesmith checkpoint"):
        export(tiny_bert, tmp_path / "out", merge=True)
    assert not (tmp_path / "out").exists()


# -- the command line -----------------------------------------------------------------------
def test_cli_export_merge(runs, tmp_path, capsys):
    best = runs("lora").best
    out = tmp_path / "merged"
    assert main(["export", str(best), str(out), "--merge"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed
    assert (out / "model.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists()
    assert read_manifest(out)["merged_from"] == "lora"
    copy = tmp_path / "copy"
    assert main(["export", str(best), str(copy)]) == 0
    assert str(copy) in capsys.readouterr().out
    assert filecmp.cmp(copy / "adapter_model.safetensors", best / "adapter_model.safetensors")


def fails_cleanly(capsys, args: list[str], *fragments: str) -> str:
    code = main(args)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert len([line for line in lines if line.startswith("error")]) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


def test_cli_export_errors_are_one_line(runs, tmp_path, capsys):
    best = runs("lora").best
    taken = tmp_path / "taken"
    taken.mkdir()
    fails_cleanly(
        capsys, ["export", str(best), str(taken), "--merge"], str(taken), "already exists"
    )
    prefix = runs("prefix").best
    fails_cleanly(
        capsys,
        ["export", str(prefix), str(tmp_path / "p"), "--merge"],
        "cannot be merged",
        "without --merge",
    )
    assert not (tmp_path / "p").exists()
    fails_cleanly(
        capsys,
        ["export", str(tmp_path / "nope"), str(tmp_path / "q")],
        "checkpoint not found",
    )
