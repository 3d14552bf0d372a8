"""LoRA, DoRA, IA3, prefix and prompt tuning (through peft).

End to end on the tiny BERT (and prefix/prompt on a tiny Llama): every base
weight of the trained model, in memory and reloaded, is bit-identical to the
pretrained folder; every saved adapter and head tensor moved from its initial
value; the saved adapter folder reloads with tunesmith and with plain peft to
the same outputs, and ``evaluate`` reproduces the logged validation metric. At
the method level: default targets per architecture, pattern errors,
``train_layers``, LoRA+ and layer-wise LR decay, checked in the real optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import tiny_config, toy_rows, write_csv
from helpers import (
    PEFT_TEST_MARKS,
    bert_config,
    bert_features,
    build_model,
    make_trainer,
    save_base,
    train_spying,
)
from tunesmith.api import TrainResult, evaluate, load_checkpoint, predict, train
from tunesmith.config.root import Config
from tunesmith.errors import ConfigError
from tunesmith.methods.base import get_method
from tunesmith.training.loop import Trainer
from tunesmith.training.monitor import read_metrics

BERT_METHODS = ["lora", "dora", "ia3", "prefix", "prompt"]
TEXTS = ["the film was superb and fun and lovely", "a dull boring story", "poor", "it was great"]


def method_config(**method: Any) -> Config:
    """A config whose only interesting part is the method section (paths are unused)."""
    return Config.from_dict(
        {"model": {"name_or_path": "unused"}, "data": {"train": "unused.csv"}, "method": method}
    )


pytestmark = PEFT_TEST_MARKS


# -- end-to-end runs, shared by the tests of this module ------------------------------------
@dataclass
class Run:
    """A finished run plus what the optimizer started from."""

    result: TrainResult
    base_dir: Path
    #: The trained PeftModel as it was at the end of the run (what final/ holds).
    model: nn.Module
    #: Adapter + head tensors under their saved names, before the first step.
    initial: dict[str, torch.Tensor]
    #: Names of the parameters that required gradients when training started.
    trainable: set[str]
    #: The padding side the run trained and validated with.
    padding_side: str


def train_capturing(cfg: Config) -> Run:
    """``api.train`` with the model handed to the Trainer captured (same object it trains)."""
    from peft import get_peft_model_state_dict

    def spy(model: nn.Module, method: Any) -> dict[str, Any]:
        return {
            "model": model,
            "initial": {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()},
            "trainable": {n for n, p in model.named_parameters() if p.requires_grad},
            "padding_side": method.padding_side or "right",
        }

    result, captured = train_spying(cfg, spy)
    assert result.loop.steps > 0
    return Run(
        result,
        Path(cfg.model.name_or_path),
        captured["model"].eval(),
        captured["initial"],
        captured["trainable"],
        captured["padding_side"],
    )


@pytest.fixture(scope="module")
def tiny_llama(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare tiny Llama (no head, pad_token_id=0) saved with the conftest tokenizer."""
    from transformers import AutoModel

    config = build_model("llama").config
    assert config.pad_token_id == 0
    return save_base(
        tmp_path_factory.mktemp("tiny-llama") / "llama", AutoModel.from_config(config), tiny_bert
    )


@pytest.fixture(scope="module")
def runs(tiny_bert: Path, tiny_llama: Path, tmp_path_factory) -> Callable[[str, str], Run]:
    """``runs(arch, method)``: a 2-epoch run at lr 1e-2, trained once per module."""
    tmp = tmp_path_factory.mktemp("peft-runs")
    data = write_csv(tmp / "toy.csv", toy_rows(48))
    bases = {"bert": tiny_bert, "llama": tiny_llama}
    cache: dict[tuple[str, str], Run] = {}

    def get(arch: str, method: str) -> Run:
        if (arch, method) not in cache:
            cfg = tiny_config(
                bases[arch],
                data,
                tmp / f"{arch}-{method}",
                method={"name": method},
                optim={"lr": 1e-2},
                train={"epochs": 2, "precision": "fp32"},
            )
            cache[arch, method] = train_capturing(Config.from_dict(cfg))
        return cache[arch, method]

    return get


def base_weight_name(name: str, prefix: str) -> str:
    """Name inside the underlying transformers model -> key in the bare base folder."""
    return name.replace(".base_layer.", ".").removeprefix(prefix)


def check_base_untouched(model: nn.Module, base_dir: Path, prefix: str) -> None:
    """Every pretrained weight inside the (peft-wrapped) model equals the base folder's."""
    base = load_file(base_dir / "model.safetensors")
    seen = set()
    for name, p in model.get_base_model().named_parameters():
        if ".original_module." in name or ".modules_to_save." in name:
            continue  # the head's pristine copy / its trained copy: not pretrained weights
        if "lora_" in name or "ia3_" in name:
            continue
        key = base_weight_name(name, prefix)
        assert key in base, f"{name}: not an adapter, a head or a pretrained weight"
        assert torch.equal(p.detach(), base[key]), f"{name} differs from the base model"
        seen.add(key)
    assert seen == set(base), "every pretrained weight is in the model"


def is_adapter_or_head(name: str) -> bool:
    """Parameters an adapter run may train: adapter tensors, prompt encoders, the head copy."""
    return (
        any(part in name for part in (".lora_A.", ".lora_B.", ".lora_magnitude_vector.", "ia3_l"))
        or name.startswith("prompt_encoder.")
        or ".modules_to_save.default." in name
    )


@pytest.mark.parametrize("method", BERT_METHODS)
def test_only_adapter_and_head_change(method, runs):
    run = runs("bert", method)
    assert run.trainable and all(is_adapter_or_head(n) for n in run.trainable), run.trainable
    # In memory after training, and rebuilt from best/ the way eval/predict do it.
    check_base_untouched(run.model, run.base_dir, "bert.")
    _cfg, _task, reloaded, _tok, _labels = load_checkpoint(run.result.best_dir)
    check_base_untouched(reloaded, run.base_dir, "bert.")

    saved = load_file(run.result.best_dir / "adapter_model.safetensors")
    assert set(saved) == set(run.initial), "the adapter file holds exactly the trained tensors"
    assert len(saved) == len(run.trainable)
    for key, value in saved.items():
        assert not torch.equal(value, run.initial[key]), f"{key} did not train"
    head = {k for k in saved if k.endswith(("classifier.weight", "classifier.bias"))}
    assert len(head) == 2, sorted(saved)
    if method in ("lora", "dora"):
        b = [k for k in saved if ".lora_B." in k]
        assert len(b) == 4  # query and value of 2 blocks
        for key in b:
            assert torch.count_nonzero(run.initial[key]) == 0, "LoRA B starts at zero"
            assert torch.count_nonzero(saved[key]) > 0, f"{key} still zero after training"
    final = load_file(run.result.final_dir / "adapter_model.safetensors")
    from peft import get_peft_model_state_dict

    now = get_peft_model_state_dict(run.model)
    assert set(final) == set(now)
    for key, value in final.items():
        assert torch.equal(value, now[key]), f"final/ {key} is not the trained tensor"


def logits_one_by_one(model: nn.Module, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Logits of each text run alone (no padding, so no padding side involved)."""
    rows = []
    with torch.no_grad():
        for text in texts:
            rows.append(model(**tokenizer(text, return_tensors="pt")).logits[0])
    return torch.stack(rows)


def predicted_probabilities(checkpoint: Path, labels: list[str]) -> torch.Tensor:
    rows = predict(checkpoint, TEXTS)
    assert [r["text"] for r in rows] == TEXTS
    return torch.tensor([[r["probabilities"][lab] for lab in labels] for r in rows])


@pytest.mark.parametrize("method", BERT_METHODS)
def test_head_is_saved_and_plain_peft_reload_matches_predict(method, runs, tiny_bert):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = runs("bert", method)
    best = run.result.best_dir
    config = (best / "adapter_config.json").read_text()
    assert '"classifier"' in config  # modules_to_save
    cfg, _task, ours, tokenizer, labels = load_checkpoint(best)
    assert labels == ["neg", "pos"]
    assert cfg.method.name == method

    plain_base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    plain = PeftModel.from_pretrained(plain_base, str(best)).eval()
    plain_tok = AutoTokenizer.from_pretrained(best)
    expected = logits_one_by_one(plain, plain_tok, TEXTS)
    torch.testing.assert_close(
        logits_one_by_one(ours, tokenizer, TEXTS), expected, atol=1e-5, rtol=0
    )
    probs = predicted_probabilities(best, labels)
    torch.testing.assert_close(probs, expected.softmax(-1), atol=1e-5, rtol=0)
    # The head is the trained one, not the freshly initialised head of the plain base.
    saved = load_file(best / "adapter_model.safetensors")
    head_key = next(k for k in saved if k.endswith("classifier.weight"))
    assert torch.equal(plain.get_base_model().classifier.weight.detach(), saved[head_key])


def check_eval_reproduces_log(run: Run) -> None:
    logged = [r for r in read_metrics(run.result.output_dir / "metrics.jsonl")]
    val = [r for r in logged if r["split"] == "validation"]
    assert len(val) == 2  # one per epoch
    best_line = next(r for r in val if r["step"] == run.result.loop.best_step)
    assert run.result.validation_metrics["accuracy"] == best_line["accuracy"]
    metrics = evaluate(run.result.best_dir, split="validation")
    assert metrics["accuracy"] == best_line["accuracy"]
    assert metrics["loss"] == pytest.approx(best_line["loss"], abs=1e-5)


@pytest.mark.parametrize(
    ("arch", "method"),
    [
        *(("bert", m) for m in BERT_METHODS),
        ("llama", "prefix"),
        pytest.param("llama", "prompt"),
    ],
)
def test_evaluate_reproduces_logged_validation(arch, method, runs):
    check_eval_reproduces_log(runs(arch, method))


PROMPT_CASES = [(a, m) for a in ("bert", "llama") for m in ("prefix", "prompt")]


@pytest.mark.parametrize(("arch", "method"), PROMPT_CASES)
def test_prefix_and_prompt_reload_equals_in_memory(arch, method, runs):
    run = runs(arch, method)
    prefix = "bert." if arch == "bert" else "model."
    _cfg, _task, reloaded, tokenizer, _labels = load_checkpoint(run.result.final_dir)
    check_base_untouched(reloaded, run.base_dir, prefix)
    check_base_untouched(run.model, run.base_dir, prefix)
    saved = load_file(run.result.final_dir / "adapter_model.safetensors")
    assert "prompt_embeddings" in saved
    assert not torch.equal(saved["prompt_embeddings"], run.initial["prompt_embeddings"])
    ours = logits_one_by_one(reloaded, tokenizer, TEXTS)
    torch.testing.assert_close(
        ours, logits_one_by_one(run.model, tokenizer, TEXTS), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    ("arch", "method"),
    [
        ("bert", "prefix"),
        ("bert", "prompt"),
        ("llama", "prefix"),
        pytest.param("llama", "prompt"),
    ],
)
def test_predict_after_reload_equals_in_memory(arch, method, runs):
    """Batched, padded prediction from the checkpoint = the trained model on the same batch."""
    from transformers import AutoTokenizer

    run = runs(arch, method)
    assert run.padding_side == ("left" if (arch, method) == ("llama", "prompt") else "right")
    tokenizer = AutoTokenizer.from_pretrained(run.base_dir)
    batch = tokenizer(TEXTS, padding=True, padding_side=run.padding_side, return_tensors="pt")
    assert int(batch["attention_mask"].sum(-1).min()) < batch["input_ids"].shape[1]
    with torch.no_grad():
        expected = run.model(**batch).logits.softmax(-1)
    labels = ["neg", "pos"]
    torch.testing.assert_close(
        predicted_probabilities(run.result.final_dir, labels), expected, atol=1e-5, rtol=0
    )


def test_prompt_tuning_on_a_decoder_reloads_with_left_padding(runs):
    run = runs("llama", "prompt")
    assert run.padding_side == "left"
    for folder in (run.result.best_dir, run.result.final_dir):
        assert load_checkpoint(folder)[3].padding_side == "left", folder


# -- method level: targets, errors, groups ------------------------------------------------
def adapted_modules(model: nn.Module) -> set[str]:
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if isinstance(module, (LoraLayer, IA3Layer))
    }


DEFAULT_TARGETS = {
    ("lora", "bert"): ["attention.self.query", "attention.self.value"],
    ("dora", "bert"): ["attention.self.query", "attention.self.value"],
    ("lora", "llama"): ["self_attn.q_proj", "self_attn.v_proj"],
    ("ia3", "bert"): [
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "output.dense",
    ],
}
BLOCK = {"bert": "bert.encoder.layer.{}.", "llama": "model.layers.{}."}
HEAD_NAME = {"bert": "classifier", "llama": "score"}


@pytest.mark.parametrize(("method", "kind"), sorted(DEFAULT_TARGETS))
def test_default_targets(method, kind):
    model = get_method(method_config(name=method)).apply(build_model(kind, 2))
    expected = {BLOCK[kind].format(i) + t for i in range(2) for t in DEFAULT_TARGETS[method, kind]}
    assert adapted_modules(model) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = HEAD_NAME[kind]
    assert {n for n in trainable if f".{head}." in n} == {
        f"base_model.model.{head}.modules_to_save.default.{p}"
        for p, _ in getattr(build_model(kind, 2), head).named_parameters()
    }
    assert all(is_adapter_or_head(n) for n in trainable), trainable


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_target_matching_nothing_names_the_pattern(method):
    m = get_method(method_config(name=method, target_modules=["query", "no_such_proj"]))
    with pytest.raises(ConfigError) as info:
        m.apply(build_model("bert"))
    message = str(info.value)
    assert "method.target_modules" in message
    assert "'no_such_proj'" in message
    assert "'query'" not in message


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_lora_train_layers_adapts_only_the_top_block(kind):
    model = get_method(method_config(name="lora", train_layers=1)).apply(build_model(kind, 3))
    targets = DEFAULT_TARGETS["lora", kind]
    assert adapted_modules(model) == {BLOCK[kind].format(2) + t for t in targets}
    lower = [BLOCK[kind].format(i) for i in (0, 1)]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not [n for n in trainable if any(b in n for b in lower)]


def optimizer_lr_by_name(trainer: Trainer) -> dict[str, float]:
    """The learning rate the real optimizer uses for each named parameter."""
    by_id = {id(p): n for n, p in trainer.model.named_parameters()}
    lrs = {}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            assert by_id[id(p)] not in lrs, "a parameter in two optimizer groups"
            lrs[by_id[id(p)]] = group["lr"]
    return lrs


def test_loraplus_gives_b_four_times_the_lr_of_a(tiny_bert, tmp_path):
    cfg = bert_config(
        tiny_bert, tmp_path, method={"name": "lora", "loraplus_lr_ratio": 4}, optim={"lr": 1e-3}
    )
    trainer, method = make_trainer(
        cfg, bert_features(tiny_bert, 8), tmp_path, model=build_model("bert")
    )
    groups = {g.name: g for g in method.param_groups(trainer.model)}
    assert set(groups) == {"block.0", "block.0/lora_B", "block.1", "block.1/lora_B", "head"}
    for i in (0, 1):
        b_group = groups[f"block.{i}/lora_B"]
        assert b_group.lr_multiplier == 4 * groups[f"block.{i}"].lr_multiplier
        assert b_group.params and all(".lora_B." in n for n, _ in b_group.params)
        assert not [n for n, _ in groups[f"block.{i}"].params if ".lora_B." in n]
    lrs = optimizer_lr_by_name(trainer)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(lrs) == trainable
    a_names = [n for n in lrs if ".lora_A." in n]
    assert len(a_names) == 4
    for a in a_names:
        b = a.replace(".lora_A.", ".lora_B.")
        assert lrs[a] == pytest.approx(1e-3, rel=1e-12)
        assert lrs[b] == pytest.approx(4e-3, rel=1e-12)
    assert lrs["base_model.model.classifier.modules_to_save.default.weight"] == pytest.approx(1e-3)


def test_llrd_gives_lower_block_adapters_a_smaller_lr(tiny_bert, tmp_path):
    cfg = bert_config(tiny_bert, tmp_path, method={"name": "lora", "llrd": 0.5}, optim={"lr": 1e-3})
    trainer, _method = make_trainer(
        cfg, bert_features(tiny_bert, 8), tmp_path, model=build_model("bert", 3)
    )
    lrs = optimizer_lr_by_name(trainer)
    for name, lr in lrs.items():
        if ".classifier." in name:
            assert lr == pytest.approx(1e-3, rel=1e-12), name
            continue
        layer = int(name.split(".layer.")[1].split(".")[0])
        assert lr == pytest.approx(1e-3 * 0.5 ** (3 - layer), rel=1e-12), name
    per_layer = {i: {lr for n, lr in lrs.items() if f".layer.{i}." in n} for i in range(3)}
    assert all(len(v) == 1 for v in per_layer.values())
    assert max(per_layer[0]) < min(per_layer[1]) < min(per_layer[2])


def test_unfreeze_with_lora_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        method_config(name="lora", unfreeze={"every_steps": 1})
    message = str(info.value)
    assert "method.unfreeze" in message
    assert "does not apply to method 'lora'" in message


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ("lora", "num_virtual_tokens", 5),
        ("lora", "train_biases", True),
        ("ia3", "r", 4),
        ("ia3", "loraplus_lr_ratio", 16),
        ("prefix", "train_layers", 1),
        ("prefix", "target_modules", ["query"]),
        ("prompt", "prefix_projection", True),
        ("prompt", "llrd", 0.5),
    ],
)
def test_adapter_key_the_method_does_not_read_is_a_config_error(name, key, value):
    with pytest.raises(ConfigError) as info:
        method_config(name=name, **{key: value})
    assert f"method.{key}: does not apply to method '{name}'" in str(info.value)


def test_lora_adapter_folder_is_small(tiny_bert, tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(tiny_bert)),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    base_dir = save_base(tmp_path / "bert256", BertModel(config), tiny_bert)
    data = write_csv(tmp_path / "d.csv", toy_rows(24))
    cfg = tiny_config(
        base_dir,
        data,
        tmp_path / "run",
        method={"name": "lora", "r": 8},
        train={"max_steps": 1, "precision": "fp32"},
    )
    result = train(Config.from_dict(cfg), progress=False)
    adapter = result.final_dir / "adapter_model.safetensors"
    assert not (result.final_dir / "model.safetensors").exists()
    base_size = (base_dir / "model.safetensors").stat().st_size
    assert adapter.stat().st_size < 0.05 * base_size, (adapter.stat().st_size, base_size)
    saved = load_file(adapter)
    assert {tuple(v.shape) for k, v in saved.items() if ".lora_A." in k} == {(8, 256)}
    assert len(saved) == 4 * 2 * 2 + 2  # A and B of query and value in 4 blocks, head
