"""QLoRA (``method.quantize_base``): LoRA over a frozen NF4 or int8 base.

On CPU the base is quantized by torchao (skipped with the reason when it is not
installed); on CUDA by bitsandbytes (skipped where there is no GPU). End to end
on the tiny BERT: only LoRA and head parameters train and get gradients; the
quantized base weights are bitwise the same after training, and the same as a
fresh quantization of the base folder (what eval rebuilds); ``evaluate``
reproduces the logged validation metrics; the merged export computes what the
QLoRA model computes; the run learns like plain LoRA. At the module level: the
quantized model stays close to fp32, its weights take a fraction of the bytes,
and every refusal is one line naming the key.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import tiny_config, toy_rows, write_csv
from helpers import PEFT_TEST_MARKS, train_spying
from tunesmith.api import TrainResult, evaluate, load_checkpoint
from tunesmith.config.root import Config
from tunesmith.deploy.export import export
from tunesmith.errors import ConfigError, ModelError
from tunesmith.methods.quantized_base import (
    MARKER,
    dequantize_base,
    is_quantized,
    quantize_base,
    read_marker,
    weight_bytes,
)
from tunesmith.training.monitor import read_metrics

KINDS = ["nf4", "int8"]
CPU = torch.device("cpu")
TEXTS = ["the film was superb and fun and lovely", "a dull boring story", "poor", "it was great"]

pytestmark = [
    *PEFT_TEST_MARKS,
    # peft's int8 LoRA layer says it cannot merge; tunesmith merges it itself (tested below).
    pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated without:UserWarning"),
]
needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None,
    reason="torchao is not installed: the CPU QLoRA backend (pip install 'tunesmith[qlora]')",
)


def _cuda_bnb_missing() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device: the bitsandbytes QLoRA path runs on GPUs only"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    return ""


needs_cuda_bnb = pytest.mark.skipif(bool(_cuda_bnb_missing()), reason=_cuda_bnb_missing())


def classifier(base: Path) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).eval()


def inner_tensors(weight: torch.Tensor) -> list[torch.Tensor]:
    """The packed data of a quantized weight (NF4: codes and scales; int8: values and scales)."""
    return [getattr(weight, name) for name in weight.__tensor_flatten__()[0]]


def quantized_state(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Copies of every quantized weight's packed data, by name inside the plain model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        name.replace(".base_layer.", "."): [t.detach().clone() for t in inner_tensors(p)]
        for name, p in base.named_parameters()
        if is_quantized(p)
    }


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


# -- the quantized base, without training --------------------------------------------------
@needs_torchao
@pytest.mark.parametrize(
    ("kind", "max_error", "max_ratio"), [("nf4", 0.02, 1 / 3), ("int8", 2e-3, 0.3)]
)
def test_quantized_base_is_close_to_fp32_and_small(tiny_bert, kind, max_error, max_ratio):
    fp32 = classifier(tiny_bert)
    model = copy.deepcopy(fp32)
    report = quantize_base(model, kind, keep=["classifier"], device=CPU)
    linears = [n for n, m in fp32.named_modules() if type(m) is nn.Linear and n != "classifier"]
    assert sorted(report.quantized) == sorted(linears)  # every block's linears and the pooler
    assert not is_quantized(model.classifier.weight)
    assert not is_quantized(model.bert.embeddings.word_embeddings.weight)
    assert all(not p.requires_grad for p in model.parameters() if is_quantized(p))
    ids = torch.randint(5, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = fp32(ids, output_hidden_states=True)
        got = model(ids, output_hidden_states=True)
    assert relative_error(want.hidden_states[-1], got.hidden_states[-1]) < max_error
    torch.testing.assert_close(got.logits, want.logits, atol=1e-2, rtol=0)
    # Memory: the packed weights against the fp32 weights they replace (storage bytes).
    assert report.bytes_after < max_ratio * report.bytes_before
    assert weight_bytes(model)["quantized"] == report.bytes_after
    assert sum(weight_bytes(model).values()) < sum(weight_bytes(fp32).values())


@needs_torchao
@pytest.mark.parametrize("kind", KINDS)
def test_dequantized_base_computes_what_the_quantized_one_does(tiny_bert, kind):
    model = classifier(tiny_bert)
    quantize_base(model, kind, keep=["classifier"], device=CPU)
    ids = torch.randint(5, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        assert dequantize_base(model) == 13
        got = model(ids).logits
    assert not any(is_quantized(p) for p in model.parameters())
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@needs_torchao
def test_nothing_to_quantize_is_a_config_error(tiny_bert):
    model = classifier(tiny_bert)
    everything = [name for name, _ in model.named_children()]
    with pytest.raises(ConfigError, match=r"method.quantize_base: .*no linear layer"):
        quantize_base(model, "nf4", keep=everything, device=CPU)


def test_missing_backend_names_the_install_command(tiny_bert, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    with pytest.raises(ConfigError, match=r"quantize_base needs torchao.*tunesmith\[qlora\]"):
        quantize_base(classifier(tiny_bert), "nf4", device=CPU)


def test_device_without_a_backend_is_refused(tiny_bert):
    with pytest.raises(ConfigError, match=r"supported on CPU .*and CUDA .*not on mps"):
        quantize_base(classifier(tiny_bert), "nf4", device=torch.device("mps"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"quantized_base.json: unreadable"),
        ('{"quantize_base": "int4", "modules": []}', r"unknown quantize_base 'int4'"),
    ],
)
def test_a_broken_marker_is_a_model_error(tmp_path, text, message):
    (tmp_path / MARKER).write_text(text)
    with pytest.raises(ModelError, match=message):
        read_marker(tmp_path)
    assert read_marker(tmp_path / "absent") is None  # a plain LoRA adapter


@needs_torchao
def test_a_recorded_module_the_base_lacks_is_a_model_error(tiny_bert):
    with pytest.raises(ModelError, match=r"quantized bert.nope, which is not a linear layer"):
        quantize_base(classifier(tiny_bert), "nf4", only=["bert.nope"], device=CPU)


@pytest.mark.parametrize(
    ("method", "value", "message"),
    [
        ("ia3", "nf4", r"method.quantize_base: does not apply to method 'ia3'"),
        ("dora", "nf4", r"method.quantize_base: does not apply to method 'dora'"),
        ("full", "int8", r"method.quantize_base: does not apply to method 'full'"),
        ("lora", "fp4", r"method.quantize_base: Input should be 'nf4' or 'int8'"),
    ],
)
def test_config_refusals_name_the_key(method, value, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(
            {
                "model": {"name_or_path": "unused"},
                "data": {"train": "unused.csv"},
                "method": {"name": method, "quantize_base": value},
            }
        )


# -- end-to-end runs, one per quantization (plus plain LoRA to compare with) --------------
@dataclass
class Run:
    result: TrainResult
    base_dir: Path
    data: Path
    model: nn.Module
    trainable: set[str]
    #: The quantized weights' packed data when training started.
    quantized: dict[str, list[torch.Tensor]]


def train_capturing(cfg: Config) -> Run:
    """``api.train`` with the model the Trainer trains captured before its first step."""

    def spy(model: nn.Module, method: Any) -> dict[str, Any]:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        return {"model": model, "trainable": trainable, "quantized": quantized_state(model)}

    result, captured = train_spying(cfg, spy)
    return Run(
        result,
        Path(cfg.model.name_or_path),
        Path(cfg.data.train),
        captured["model"],
        captured["trainable"],
        captured["quantized"],
    )


@pytest.fixture(scope="module")
def runs(tiny_bert: Path, tmp_path_factory) -> Callable[[str | None], Run]:
    """``runs(kind)``: a 4-epoch LoRA run at lr 1e-2 over a ``kind`` base (None: fp32)."""
    tmp = tmp_path_factory.mktemp("qlora-runs")
    data = write_csv(tmp / "toy.csv", toy_rows(48))
    cache: dict[str | None, Run] = {}

    def get(kind: str | None) -> Run:
        if kind not in cache:
            cfg = tiny_config(
                tiny_bert,
                data,
                tmp / f"lora-{kind}",
                method={"name": "lora", "quantize_base": kind},
                optim={"lr": 1e-2},
                train={"epochs": 4, "precision": "fp32"},
            )
            cache[kind] = train_capturing(Config.from_dict(cfg))
        return cache[kind]

    return get


def is_lora_or_head(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".modules_to_save.default." in name


@needs_torchao
@pytest.mark.parametrize("kind", KINDS)
def test_only_lora_and_head_train_and_get_gradients(kind, runs):
    run = runs(kind)
    assert run.trainable and all(is_lora_or_head(n) for n in run.trainable)
    assert run.quantized, "the base was quantized"
    model = run.model.train()
    _, _, _, tokenizer, _ = load_checkpoint(run.result.best_dir)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    model.zero_grad(set_to_none=True)
    model(**batch, labels=torch.tensor([1, 0, 0, 1])).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == run.trainable
    # LoRA in the lower block learns through the quantized layers above it.
    lower = [n for n in with_grad if ".layer.0." in n and "lora_A" in n]
    assert lower and all(model.get_parameter(n).grad.abs().sum() > 0 for n in lower)
    model.zero_grad(set_to_none=True)
    model.eval()


@needs_torchao
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_base_is_bitwise_unchanged_and_rebuilt_the_same(kind, runs):
    run = runs(kind)
    after = quantized_state(run.model)
    assert after.keys() == run.quantized.keys()
    for name, tensors in run.quantized.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, after[name], strict=True)), name
    # What eval and predict rebuild: the base folder quantized again, bit for bit the same.
    _, _, reloaded, _, _ = load_checkpoint(run.result.best_dir)
    rebuilt = quantized_state(reloaded)
    assert rebuilt.keys() == after.keys()
    for name, tensors in rebuilt.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, after[name], strict=True)), name
    marker = json.loads((run.result.best_dir / MARKER).read_text())
    assert marker["quantize_base"] == kind and len(marker["modules"]) == len(after)


@needs_torchao
@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_reproduces_the_logged_validation(kind, runs):
    run = runs(kind)
    got = evaluate(run.result.best_dir, split="validation")
    want = run.result.validation_metrics
    assert got["accuracy"] == want["accuracy"]
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)


@needs_torchao
@pytest.mark.parametrize("kind", KINDS)
def test_lora_over_the_quantized_base_fits_a_batch_like_over_fp32(tiny_bert, kind):
    """The optimisation works through the quantized layers: a batch is fitted as over fp32."""
    from peft import LoraConfig, get_peft_model

    def fit(quantize: str | None) -> list[float]:
        model = classifier(tiny_bert)
        if quantize:
            quantize_base(model, quantize, keep=["classifier"], device=CPU)
        config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
        config.modules_to_save = ["classifier"]
        model = get_peft_model(model, config).train()
        torch.manual_seed(0)
        ids = torch.randint(5, 50, (8, 10))
        labels = torch.tensor([0, 1] * 4)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=2e-2)
        losses = []
        for _ in range(25):
            loss = model(ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    fp32, quantized = fit(None), fit(kind)
    assert quantized[-1] < 0.1 < 0.6 < quantized[0]
    assert quantized[-1] == pytest.approx(fp32[-1], abs=0.05)


@needs_torchao
@pytest.mark.parametrize("kind", KINDS)
def test_run_tracks_plain_lora(kind, runs):
    """On the toy run, the logged training losses stay within rounding of plain LoRA's."""
    run, plain = runs(kind), runs(None)

    def train_losses(r: Run) -> list[float]:
        rows = read_metrics(r.result.output_dir / "metrics.jsonl")
        return [row["loss"] for row in rows if row.get("split") == "train" and "loss" in row]

    losses, plain_losses = train_losses(run), train_losses(plain)
    assert len(losses) == len(plain_losses) > 1
    assert losses == pytest.approx(plain_losses, abs=0.02)
    assert run.result.validation_metrics["loss"] == pytest.approx(
        plain.result.validation_metrics["loss"], abs=0.02
    )


@needs_torchao
@pytest.mark.parametrize("kind", KINDS)
def test_merged_export_computes_what_the_qlora_model_computes(kind, runs, tmp_path):
    from transformers import AutoModelForSequenceClassification

    run = runs(kind)
    out = export(run.result.best_dir, tmp_path / "merged", merge=True)
    _, _, qlora, tokenizer, _ = load_checkpoint(run.result.best_dir)
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()  # no tunesmith
    assert not any(is_quantized(p) for p in plain.parameters())
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, qlora(**batch).logits, atol=1e-5, rtol=0)


@needs_torchao
def test_int8_export_of_a_qlora_run_names_its_quantized_base(runs):
    from tunesmith.deploy.compare import compare_checkpoints, format_comparison
    from tunesmith.deploy.int8_export import export_int8
    from tunesmith.evaluation.evaluator import EvalOptions

    best = runs("nf4").result.best_dir
    out = export_int8(best, best.parent / "int8")  # inside the run: its splits are found
    options = EvalOptions(batch_size=4, latency_batches=1, warmup=0)
    result = compare_checkpoints(best, out, split="validation", options=options)
    assert result.before_label == "nf4 base"
    assert format_comparison(result).splitlines()[1].split()[:2] == ["nf4", "base"]


@needs_torchao
def test_the_adapter_library_refuses_a_qlora_adapter(runs, tmp_path):
    from tunesmith.runs.library import AdapterLibrary

    with pytest.raises(ConfigError, match=r"a QLoRA adapter .*quantize_base nf4.*directly"):
        AdapterLibrary(tmp_path / "library").add("q", runs("nf4").result.best_dir)
    assert not (tmp_path / "library" / "q").exists()


# -- CUDA: bitsandbytes ----------------------------------------------------------------------
@needs_cuda_bnb
@pytest.mark.parametrize("kind", KINDS)
def test_bitsandbytes_qlora_on_cuda(tiny_bert, kind):
    """QLoRA's GPU path: bitsandbytes layers, LoRA trains, the packed base stays put."""
    from peft import LoraConfig, get_peft_model

    device = torch.device("cuda")
    fp32 = classifier(tiny_bert).to(device)
    model = copy.deepcopy(fp32)
    report = quantize_base(model, kind, keep=["classifier"], device=device)
    assert report.backend == "bitsandbytes" and report.quantized
    # (bitsandbytes keeps a 1 KiB code table per 4-bit layer: large against tiny layers.)
    assert report.bytes_after < report.bytes_before
    model.to(device)
    ids = torch.randint(5, 50, (4, 12), device=device)
    with torch.no_grad():
        want = fp32(ids, output_hidden_states=True).hidden_states[-1]
        got = model(ids, output_hidden_states=True).hidden_states[-1]
    assert relative_error(want.float(), got.float()) < 0.05
    config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    config.modules_to_save = ["classifier"]
    peft_model = get_peft_model(model, config)
    packed = {n: p.detach().clone() for n, p in peft_model.named_parameters() if is_quantized(p)}
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    labels = torch.tensor([0, 1, 0, 1], device=device)
    peft_model.train()
    for _ in range(3):
        peft_model(ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    names = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(is_lora_or_head(n) for n in names)
    for name, p in peft_model.named_parameters():
        if name in packed:
            assert torch.equal(p.detach(), packed[name]), name
