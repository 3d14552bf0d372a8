"""Bottleneck adapters: identity at init, placement, what trains, checkpoints.

The adapters are our own code (peft has none), so they get the checks every
custom layer gets: finite-difference gradients, the exact identity before
training on several architectures (with a perturbed adapter showing the hooks
are live), and an end-to-end run whose base weights must stay bit-identical
and whose adapter checkpoint must reload to the same logits.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import tiny_config, toy_rows, write_csv
from helpers import build_model
from tunesmith.api import evaluate, load_checkpoint, predict, train
from tunesmith.config.root import Config
from tunesmith.errors import ConfigError, ModelError
from tunesmith.methods.base import METHODS, get_method
from tunesmith.methods.bottleneck import (
    ADAPTERS_ATTR,
    CONFIG_FILE,
    WEIGHTS_FILE,
    Bottleneck,
    BottleneckAdapter,
    adapters_of,
)
from tunesmith.testing import gradcheck_module
from tunesmith.training.monitor import read_metrics

ACTIVATIONS = ["relu", "gelu", "tanh", "silu"]
#: Module path of the block lists, and of the attention sub-module inside a block.
BLOCKS = {
    "bert": (["bert.encoder.layer"], "attention"),
    "distilbert": (["distilbert.transformer.layer"], "attention"),
    "llama": (["model.layers"], "self_attn"),
    "gpt2": (["transformer.h"], "attn"),
    "t5": (["transformer.encoder.block", "transformer.decoder.block"], "layer.0"),
}
HEAD = {"bert": ("classifier.",), "llama": ("score.",), "t5": ("classification_head.",)}


def method_config(**method) -> Config:
    """A config whose only interesting part is the method section (paths are unused)."""
    return Config.from_dict(
        {
            "model": {"name_or_path": "unused"},
            "data": {"train": "unused.csv"},
            "method": {"name": "bottleneck", **method},
        }
    )


def adapt(model: nn.Module, **method) -> tuple[nn.Module, Bottleneck]:
    bottleneck = get_method(method_config(**method))
    assert isinstance(bottleneck, Bottleneck)
    return bottleneck.apply(model), bottleneck


def inputs(seed: int = 3) -> dict[str, torch.Tensor]:
    """A padded batch that every tiny model accepts (T5 needs an eos in each row)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = 0, 0
    ids[0, -1], ids[1, 5], ids[2, -1] = 3, 3, 3
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.eval()(**batch).logits


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Random ``up`` weights in every adapter: a trained adapter is no identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, adapter in adapters_of(model):
            adapter.up.weight.copy_(torch.randn(adapter.up.weight.shape, generator=gen))


# -- the adapter itself --------------------------------------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_adapter_gradcheck(activation):
    torch.manual_seed(0)
    adapter = BottleneckAdapter(12, reduction_factor=3, activation=activation)
    assert (adapter.down.out_features, adapter.up.in_features) == (4, 4)
    with torch.no_grad():  # non-zero up: every parameter gets a non-trivial gradient
        adapter.up.weight.normal_()
        adapter.up.bias.normal_()
    x = torch.randn(2, 5, 12)
    assert not torch.allclose(adapter(x), x)
    assert gradcheck_module(adapter, [x])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_untrained_adapter_is_exactly_the_identity(activation):
    adapter = BottleneckAdapter(16, reduction_factor=4, activation=activation)
    x = torch.randn(4, 7, 16) * 10
    assert torch.equal(adapter(x), x)
    assert torch.count_nonzero(adapter.down.weight) > 0
    assert torch.count_nonzero(adapter.up.weight) == 0


def test_adapter_keeps_float32_on_a_half_precision_input():
    adapter = BottleneckAdapter(8, reduction_factor=2)
    with torch.no_grad():
        adapter.up.weight.fill_(0.1)
    x = torch.randn(2, 8).to(torch.bfloat16)
    out = adapter(x)
    assert out.dtype == torch.bfloat16 and adapter.up.weight.dtype == torch.float32
    expected = x.float() + adapter.up(adapter.act(adapter.down(x.float())))
    assert torch.allclose(out.float(), expected, atol=0.05)


def test_bottleneck_smaller_than_one_unit_is_a_config_error():
    with pytest.raises(ConfigError, match="reduction_factor"):
        adapt(build_model("bert"), reduction_factor=32)  # hidden size 16


# -- insertion ------------------------------------------------------------------------------
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("kind", ["bert", "llama", "t5"])
def test_untrained_adapters_leave_the_model_unchanged(kind, placement):
    model = build_model(kind)
    batch = inputs()
    before = logits(model, batch)
    adapt(model, placement=placement, reduction_factor=4)
    assert adapters_of(model)
    assert torch.allclose(logits(model, batch), before, atol=1e-6, rtol=0)
    perturb(model)  # the hooks are live: a non-zero adapter changes the output
    assert not torch.allclose(logits(model, batch), before, atol=1e-3)


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_adapters_per_block(kind, placement):
    model, _ = adapt(build_model(kind, 3), placement=placement, reduction_factor=4)
    stacks, attention = BLOCKS[kind]
    expected = set()
    for stack in stacks:
        for i in range(3):
            expected.add((f"{stack}.{i}", "output"))
            if placement == "houlsby":
                expected.add((f"{stack}.{i}.{attention}", "attention"))
    found = [(path, key) for path, key, _ in adapters_of(model)]
    assert len(found) == len(expected) == len(stacks) * 3 * (2 if placement == "houlsby" else 1)
    assert set(found) == expected
    for _, _, adapter in adapters_of(model):
        assert (adapter.hidden_size, adapter.bottleneck_size) == (16, 4)


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_train_layers_one_adapts_only_the_top_block(kind, placement):
    model, _ = adapt(build_model(kind, 3), placement=placement, train_layers=1)
    stacks, _ = BLOCKS[kind]
    paths = {path for path, _, _ in adapters_of(model)}
    assert len(paths) == len(stacks) * (2 if placement == "houlsby" else 1)
    for path in paths:
        assert any(path.startswith(f"{stack}.2") for stack in stacks), path
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ADAPTERS_ATTR in n}
    assert len(trainable) == 4 * len(paths)
    assert all(any(n.startswith(f"{stack}.2.") for stack in stacks) for n in trainable)


def test_train_layers_zero_is_a_config_error():
    with pytest.raises(ConfigError, match="adapts no block"):
        adapt(build_model("bert"), train_layers=0)


class MLPBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class MLPStack(nn.Module):
    """A model without attention (and without ``hidden_size`` in its config)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="mlp")
        self.embed = nn.Embedding(20, d)
        self.blocks = nn.ModuleList(MLPBlock(d) for _ in range(2))
        self.norm = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        return self.classifier(self.norm(h).mean(1))


def test_houlsby_without_an_attention_child_is_a_config_error():
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match=r"houlsby .* blocks\.0 \(MLPBlock\) has no attention"):
        adapt(MLPStack(), placement="houlsby")


def test_pfeiffer_works_on_any_block_list():
    torch.manual_seed(0)
    model = MLPStack().eval()
    ids = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        before = model(ids)
    adapt(model, reduction_factor=2)
    assert [(p, k) for p, k, _ in adapters_of(model)] == [
        ("blocks.0", "output"),
        ("blocks.1", "output"),
    ]
    assert adapters_of(model)[0][2].hidden_size == 8  # guessed from the block's parameters
    with torch.no_grad():
        assert torch.equal(model(ids), before)
        perturb(model)
        assert not torch.allclose(model(ids), before)


def test_adapters_are_submodules_copied_and_moved_with_the_model():
    model, _ = adapt(build_model("bert"), placement="houlsby")
    names = [n for n, _ in model.named_parameters() if ADAPTERS_ATTR in n]
    assert "bert.encoder.layer.0.tunesmith_adapters.output.down.weight" in names
    assert "bert.encoder.layer.0.attention.tunesmith_adapters.attention.up.bias" in names
    assert set(names) <= set(model.state_dict())
    batch = inputs()
    before = logits(model, batch)
    clone = copy.deepcopy(model)
    perturb(clone)  # the copy's hooks use the copy's adapters, not the original's
    assert torch.equal(logits(model, batch), before)
    assert not torch.allclose(logits(clone, batch), before, atol=1e-3)
    clone.double()
    assert all(a.up.weight.dtype == torch.float64 for _, _, a in adapters_of(clone))


# -- what trains ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "llama", "t5"])
def test_only_adapters_and_head_train(kind):
    model, method = adapt(build_model(kind), placement="houlsby")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        n for n, _ in model.named_parameters() if ADAPTERS_ATTR in n or n.startswith(HEAD[kind])
    }
    assert trainable == expected
    assert any(n.startswith(HEAD[kind]) for n in trainable)
    grouped = [n for g in method.param_groups(model) for n, _ in g.params]
    assert sorted(grouped) == sorted(expected)
    layer_groups = method.layer_groups(model)
    assert sum(len(ps) for ps in layer_groups.values()) == len(list(model.parameters()))


def test_lr_multipliers_follow_the_adapters_block():
    model, method = adapt(
        build_model("bert", 3), llrd=0.5, lr_multipliers={"head": 3.0}, placement="houlsby"
    )
    groups = {g.name: g for g in method.param_groups(model)}
    assert {n: g.lr_multiplier for n, g in groups.items()} == pytest.approx(
        {"block.0": 0.125, "block.1": 0.25, "block.2": 0.5, "head": 3.0}
    )
    for i in range(3):
        names = {n for n, _ in groups[f"block.{i}"].params}
        assert len(names) == 8 and all(n.startswith(f"bert.encoder.layer.{i}.") for n in names)


@pytest.mark.parametrize(("key", "value"), [("r", 4), ("include", ["classifier.*"])])
def test_key_bottleneck_does_not_use_is_a_config_error(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}: does not apply to method 'bottleneck'"):
        method_config(**{key: value})


def test_registered_and_not_mergeable():
    assert METHODS.get("bottleneck") is Bottleneck
    assert Bottleneck.saves_adapter
    assert Bottleneck.merged(build_model("bert")) is None
    assert "non-linearity" in (Bottleneck.merged.__doc__ or "")


# -- end to end -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory):
    """A short bottleneck run on the tiny BERT, with the model it held in memory."""
    import tunesmith.training.loop as loop

    tmp = tmp_path_factory.mktemp("bottleneck")
    data = write_csv(tmp / "toy.csv", toy_rows(120))
    cfg = Config.from_dict(
        tiny_config(
            tiny_bert,
            data,
            tmp / "run",
            method={"name": "bottleneck", "reduction_factor": 4},
            train={"epochs": 3, "precision": "fp32"},
        )
    )
    initial: dict[str, torch.Tensor] = {}
    saved: list[tuple[nn.Module, str]] = []
    real_build, real_save = loop.build_optimizer, Bottleneck.save_weights

    def spy_build(groups, optim_cfg):
        for group in groups:
            for name, p in group.params:
                initial[name] = p.detach().clone()
        return real_build(groups, optim_cfg)

    def spy_save(self, model, folder, weights=None):
        saved.append((model, Path(folder).name))
        return real_save(self, model, folder, weights)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "build_optimizer", spy_build)
        mp.setattr(Bottleneck, "save_weights", spy_save)
        result = train(cfg, progress=False)
    return SimpleNamespace(result=result, initial=initial, saved=saved)


def test_e2e_only_adapters_and_head_change(run, tiny_bert):
    model, folder = run.saved[-1]
    assert folder == "final.tmp"
    assert run.result.loop.steps > 0
    base = load_file(tiny_bert / "model.safetensors")
    params = dict(model.named_parameters())
    trained = {n for n in params if ADAPTERS_ATTR in n or n.startswith("classifier.")}
    assert set(run.initial) == trained
    assert len(trained) == 2 * 4 + 2  # two blocks x (down, up) x (weight, bias) + head
    for name, p in params.items():
        if name in trained:
            assert not torch.equal(p.detach(), run.initial[name]), f"{name} did not train"
        else:
            assert torch.equal(p.detach(), base[name.removeprefix("bert.")]), f"{name} changed"
    assert {n.removeprefix("bert.") for n in params if n not in trained} == set(base)


def test_e2e_checkpoint_holds_only_adapters_and_head(run, tiny_bert):
    for folder in (run.result.best_dir, run.result.final_dir):
        assert folder is not None
        assert not (folder / "model.safetensors").exists()
        tensors = load_file(folder / WEIGHTS_FILE)
        assert set(tensors) == set(run.initial)
        size = (folder / WEIGHTS_FILE).stat().st_size
        assert size * 10 < (tiny_bert / "model.safetensors").stat().st_size
        config = json.loads((folder / CONFIG_FILE).read_text())
        assert config["reduction_factor"] == 4 and config["placement"] == "pfeiffer"
        assert config["activation"] == "relu" and config["hidden_size"] == 32
        assert config["blocks"] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
        assert config["base_model"] == str(tiny_bert)
        assert config["head"] == ["classifier"]
        manifest = json.loads((folder / "tunesmith.json").read_text())
        assert manifest["method"] == "bottleneck" and manifest["adapter"] is True


def test_e2e_evaluate_reproduces_logged_validation(run):
    result = run.result
    records = read_metrics(result.output_dir / "metrics.jsonl")
    val_lines = [r for r in records if r["split"] == "validation"]
    assert val_lines and result.validation_metrics
    metrics = evaluate(result.best_dir, split="validation")
    assert metrics["accuracy"] == result.validation_metrics["accuracy"]
    assert metrics["loss"] == pytest.approx(result.validation_metrics["loss"], abs=1e-6)


def test_e2e_predict(run):
    rows = predict(run.result.final_dir, ["the film was superb", "a dull boring story"])
    assert [r["text"] for r in rows] == ["the film was superb", "a dull boring story"]
    for row in rows:
        assert row["label"] in ("neg", "pos")
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_e2e_reload_gives_the_in_memory_logits(run):
    model, _ = run.saved[-1]
    _cfg, _task, reloaded, tokenizer, _labels = load_checkpoint(run.result.final_dir)
    assert len(adapters_of(reloaded)) == len(adapters_of(model)) == 2
    texts = ["the film was superb and fun", "a dull boring story", "it was really poor"]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    ours, theirs = logits(model, batch), logits(reloaded, batch)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    perturb(reloaded)  # the reloaded adapters are in the forward pass
    assert not torch.allclose(logits(reloaded, batch), ours, atol=1e-3)


def test_reload_is_strict_about_missing_tensors(run, tmp_path):
    folder = run.result.final_dir
    tensors = load_file(folder / WEIGHTS_FILE)
    tensors.pop("bert.encoder.layer.1.tunesmith_adapters.output.up.weight")
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(tensors, str(broken / WEIGHTS_FILE))
    (broken / CONFIG_FILE).write_text((folder / CONFIG_FILE).read_text())
    _cfg, task, _, tokenizer, labels = load_checkpoint(folder)
    with pytest.raises(ModelError, match=r"missing: \['bert.encoder.layer.1.tunesmith_adapters"):
        Bottleneck.load_saved(task.build_model(labels, tokenizer), broken)
    with pytest.raises(ModelError, match=r"bottleneck_config\.json missing"):
        Bottleneck.load_saved(task.build_model(labels, tokenizer), tmp_path)
