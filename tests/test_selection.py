"""Which parameters train (full / freeze strategies) and at which learning rate.

End to end on the tiny BERT (and one run each on a tiny Llama and T5): every
frozen weight of the saved model is bit-identical to the pretrained one and
every trainable weight moved. At the method level, each strategy is checked on
models built in the test against hand-written name rules. The learning rate of
every optimizer group is checked at every step of a short run against
``lr x multiplier x schedule``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config, toy_rows, write_csv
from helpers import Recorder, bert_config, bert_features, build_model, make_trainer, save_base
from tunesmith.api import train
from tunesmith.config.root import Config
from tunesmith.errors import ConfigError
from tunesmith.methods.base import get_method

Rule = Callable[[str], bool]


def method_config(**method) -> Config:
    """A config whose only interesting part is the method section (paths are unused)."""
    return Config.from_dict(
        {"model": {"name_or_path": "unused"}, "data": {"train": "unused.csv"}, "method": method}
    )


# -- hand-written name rules per architecture ----------------------------------------------
HEAD: dict[str, Rule] = {
    "bert": lambda n: n.startswith(("bert.pooler.", "classifier.")),
    "llama": lambda n: n == "score.weight",
    "gpt2": lambda n: n == "score.weight",
    "t5": lambda n: n.startswith("classification_head."),
}
TOP1: dict[str, Rule] = {  # the top block of each stack, final norms included
    "bert": lambda n: n.startswith("bert.encoder.layer.1."),
    "llama": lambda n: n.startswith("model.layers.1.") or n == "model.norm.weight",
    "gpt2": lambda n: n.startswith(("transformer.h.1.", "transformer.ln_f.")),
    "t5": lambda n: n.startswith(
        (
            "transformer.encoder.block.1.",
            "transformer.decoder.block.1.",
            "transformer.encoder.final_layer_norm.",
            "transformer.decoder.final_layer_norm.",
        )
    ),
}
EMBEDDINGS: dict[str, Rule] = {
    "bert": lambda n: n.startswith("bert.embeddings."),
    "llama": lambda n: n == "model.embed_tokens.weight",
    "gpt2": lambda n: n in ("transformer.wte.weight", "transformer.wpe.weight"),
    "t5": lambda n: n == "transformer.shared.weight",
}
NORMS: dict[str, Rule] = {
    "bert": lambda n: ".LayerNorm." in n,
    "llama": lambda n: n.endswith("layernorm.weight") or n == "model.norm.weight",
    "gpt2": lambda n: ".ln_" in n,
    "t5": lambda n: "layer_norm." in n,
}
BIASES: Rule = lambda n: n.endswith(".bias")  # noqa: E731
# (glob, the same set as a rule)
INCLUDE: dict[str, tuple[str, Rule]] = {
    "bert": (
        "bert.encoder.layer.0.attention.self.*",
        lambda n: n.startswith("bert.encoder.layer.0.attention.self."),
    ),
    "llama": ("model.layers.0.self_attn.*", lambda n: n.startswith("model.layers.0.self_attn.")),
    "gpt2": ("transformer.h.0.attn.*", lambda n: n.startswith("transformer.h.0.attn.")),
    "t5": (
        "transformer.encoder.block.0.layer.0.*",
        lambda n: n.startswith("transformer.encoder.block.0.layer.0."),
    ),
}
EXCLUDE: dict[str, tuple[str, Rule]] = {
    "bert": ("*.layer.1.output.*", lambda n: n.startswith("bert.encoder.layer.1.output.")),
    "llama": ("*.layers.1.mlp.*", lambda n: n.startswith("model.layers.1.mlp.")),
    "gpt2": ("transformer.h.1.mlp.*", lambda n: n.startswith("transformer.h.1.mlp.")),
    "t5": ("*.decoder.block.1.*", lambda n: n.startswith("transformer.decoder.block.1.")),
}

STRATEGIES: dict[str, tuple[Callable[[str], dict], Callable[[str], Rule]]] = {
    "head-only": (lambda k: {"name": "freeze"}, lambda k: HEAD[k]),
    "train_layers=1": (
        lambda k: {"name": "freeze", "train_layers": 1},
        lambda k: lambda n: HEAD[k](n) or TOP1[k](n),
    ),
    "train_layers=2": (
        lambda k: {"name": "freeze", "train_layers": 2},
        lambda k: lambda n: not EMBEDDINGS[k](n),
    ),
    "bitfit": (
        lambda k: {"name": "freeze", "train_biases": True},
        lambda k: lambda n: HEAD[k](n) or BIASES(n),
    ),
    "norms": (
        lambda k: {"name": "freeze", "train_norms": True},
        lambda k: lambda n: HEAD[k](n) or NORMS[k](n),
    ),
    "embeddings": (
        lambda k: {"name": "freeze", "train_embeddings": True},
        lambda k: lambda n: HEAD[k](n) or EMBEDDINGS[k](n),
    ),
    "include": (
        lambda k: {"name": "freeze", "include": [INCLUDE[k][0]]},
        lambda k: lambda n: HEAD[k](n) or INCLUDE[k][1](n),
    ),
    "exclude": (
        lambda k: {"name": "freeze", "train_layers": 1, "exclude": [EXCLUDE[k][0]]},
        lambda k: lambda n: (HEAD[k](n) or TOP1[k](n)) and not EXCLUDE[k][1](n),
    ),
    "exclude-wins": (
        lambda k: {"name": "freeze", "include": [INCLUDE[k][0]], "exclude": [INCLUDE[k][0]]},
        lambda k: HEAD[k],
    ),
    "full": (lambda k: {"name": "full"}, lambda k: lambda n: True),
    "full-freeze-embeddings": (
        lambda k: {"name": "full", "freeze_embeddings": True},
        lambda k: lambda n: not EMBEDDINGS[k](n),
    ),
    "full-exclude": (
        lambda k: {"name": "full", "exclude": [EXCLUDE[k][0]]},
        lambda k: lambda n: not EXCLUDE[k][1](n),
    ),
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("kind", ["bert", "llama", "t5", "gpt2"])
def test_strategy_selects_exactly(kind, strategy):
    make_method, make_rule = STRATEGIES[strategy]
    model = build_model(kind)
    names = [n for n, _ in model.named_parameters()]
    rule = make_rule(kind)
    expected = {n for n in names if rule(n)}
    assert expected, "the rule must select something"
    if strategy not in ("head-only", "exclude-wins") and not (
        strategy == "bitfit" and kind in ("llama", "t5")  # no biases outside the head
    ):
        assert expected != {n for n in names if HEAD[kind](n)}, "the case must add to the head"

    method = get_method(method_config(**make_method(kind)))
    model = method.apply(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    grouped = [n for g in method.param_groups(model) for n, _ in g.params]
    assert len(grouped) == len(set(grouped)), "a parameter in two groups"
    assert set(grouped) == expected


def test_bitfit_on_bert_trains_every_bias_and_nothing_else():
    method = get_method(method_config(name="freeze", train_biases=True))
    model = method.apply(build_model("bert"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable - {"classifier.weight", "bert.pooler.dense.weight"} == {
        n for n, _ in model.named_parameters() if n.endswith(".bias")
    }
    assert "bert.encoder.layer.0.attention.self.query.bias" in trainable
    assert "bert.encoder.layer.0.attention.self.query.weight" not in trainable


def test_train_layers_beyond_a_shorter_stack_trains_all_of_it():
    method = get_method(method_config(name="freeze", train_layers=3))
    model = method.apply(build_model("t5", 3, decoder_layers=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.decoder.block.0.layer.0.SelfAttention.q.weight" in trainable
    assert "transformer.encoder.block.0.layer.0.SelfAttention.q.weight" in trainable


@pytest.mark.parametrize("key", ["include", "exclude"])
def test_glob_matching_nothing_names_the_pattern(key):
    method = get_method(method_config(name="freeze", **{key: ["classifier.*", "bert.nope.*"]}))
    with pytest.raises(ConfigError) as info:
        method.apply(build_model("bert"))
    message = str(info.value)
    assert f"method.{key}: pattern 'bert.nope.*' matches no parameter" in message
    assert "bert.embeddings.word_embeddings.weight" in message  # shows what names look like


def test_selection_leaving_nothing_is_an_error():
    method = get_method(method_config(name="freeze", exclude=["*"]))
    with pytest.raises(ConfigError, match="leaves no parameter to train"):
        method.apply(build_model("bert"))


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ("full", "train_layers", 1),
        ("full", "train_biases", True),
        ("full", "train_norms", True),
        ("full", "train_embeddings", True),
        ("full", "include", ["classifier.*"]),
        ("freeze", "freeze_embeddings", True),
    ],
)
def test_key_the_method_does_not_use_is_a_config_error(name, key, value):
    with pytest.raises(ConfigError) as info:
        method_config(name=name, **{key: value})
    message = str(info.value)
    assert f"method.{key}: does not apply to method '{name}'" in message


def test_neutral_values_of_unused_keys_are_accepted():
    cfg = method_config(name="full", train_biases=False, include=[], train_layers=None)
    assert cfg.method.name == "full"


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown method 'lorra'.*did you mean 'lora'"):
        method_config(name="lorra")


# -- end to end: frozen weights are bit-identical in the saved model -----------------------
def _spy_initial(monkeypatch) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters as the optimizer receives them."""
    import tunesmith.training.loop as loop

    initial: dict[str, torch.Tensor] = {}
    real = loop.build_optimizer

    def spy(groups, cfg):
        for group in groups:
            for name, p in group.params:
                initial[name] = p.detach().clone()
        return real(groups, cfg)

    monkeypatch.setattr(loop, "build_optimizer", spy)
    return initial


def _check_saved(
    base_dir: Path, saved_dir: Path, prefix: str, trainable: Rule, initial: dict[str, torch.Tensor]
) -> None:
    """Frozen weights equal the base model's bit for bit; trainable ones moved."""
    base = load_file(base_dir / "model.safetensors")
    saved = load_file(saved_dir / "model.safetensors")
    # The base folder was saved by the bare model (no prefix), the run by the
    # task model (``<prefix>.`` + a new head).
    to_base = {k: k.removeprefix(prefix) for k in saved if k.startswith(prefix)}
    assert set(to_base.values()) == set(base), "every pretrained weight is in the saved model"
    expected = {k for k in saved if trainable(k)}
    assert set(initial) == expected, "the optimizer got exactly the trainable parameters"
    frozen = [k for k in saved if k not in expected]
    assert frozen and expected
    for key in frozen:
        assert key in to_base, f"{key}: frozen but not pretrained"
        assert torch.equal(saved[key], base[to_base[key]]), f"{key} changed while frozen"
    for key in expected:
        assert not torch.equal(saved[key], initial[key]), f"{key} did not train"
        if key in to_base:
            assert torch.equal(initial[key], base[to_base[key]])


def test_freeze_top_layer_end_to_end_bert(tiny_bert, tmp_path, monkeypatch):
    initial = _spy_initial(monkeypatch)
    data = write_csv(tmp_path / "d.csv", toy_rows(64))
    cfg = Config.from_dict(
        tiny_config(
            tiny_bert,
            data,
            tmp_path / "run",
            method={"name": "freeze", "train_layers": 1},
            train={"epochs": 2, "precision": "fp32"},
        )
    )
    result = train(cfg, progress=False)
    assert result.loop.steps > 0
    rule = lambda n: HEAD["bert"](n) or TOP1["bert"](n)  # noqa: E731
    _check_saved(tiny_bert, result.final_dir, "bert.", rule, initial)
    assert result.best_dir is not None
    best = load_file(result.best_dir / "model.safetensors")
    base = load_file(tiny_bert / "model.safetensors")
    for key, value in best.items():
        if not rule(key):
            assert torch.equal(value, base[key.removeprefix("bert.")]), key
    rows = {r["group"]: r for r in result.parameters}
    assert rows["block.0"]["trainable"] == rows["embeddings"]["trainable"] == 0
    assert rows["block.1"]["trainable"] == rows["block.1"]["parameters"] > 0


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_freeze_top_layer_end_to_end_other_architectures(kind, tiny_bert, tmp_path, monkeypatch):
    from transformers import AutoModel

    cls_model = build_model(kind)
    base_model = AutoModel.from_config(cls_model.config)  # the bare model, no head
    prefix = cls_model.base_model_prefix + "."
    base_dir = save_base(tmp_path / kind, base_model, tiny_bert)
    initial = _spy_initial(monkeypatch)
    data = write_csv(tmp_path / "d.csv", toy_rows(48))
    cfg = Config.from_dict(
        tiny_config(
            base_dir,
            data,
            tmp_path / "run",
            method={"name": "freeze", "train_layers": 1},
            train={"epochs": 1, "precision": "fp32"},
        )
    )
    result = train(cfg, progress=False)
    assert result.loop.steps > 0
    rule = lambda n: HEAD[kind](n) or TOP1[kind](n)  # noqa: E731
    _check_saved(base_dir, result.final_dir, prefix, rule, initial)


# -- learning rates: pyramid multipliers, layer-wise decay, weight-decay split -------------
PYRAMID = {"embeddings": 0.1, "blocks": [0.2, 0.6], "head": 2.0}
LR_CASES = {
    "llrd": ({"llrd": 0.5}, 2, {"embeddings": 0.125, "block.0": 0.25, "block.1": 0.5, "head": 1}),
    "pyramid": (
        {"lr_multipliers": PYRAMID},
        3,
        {"embeddings": 0.1, "block.0": 0.2, "block.1": 0.4, "block.2": 0.6, "head": 2.0},
    ),
    "pyramid-scalar": (
        {"lr_multipliers": {"blocks": 0.3}},
        2,
        {"embeddings": 1.0, "block.0": 0.3, "block.1": 0.3, "head": 1.0},
    ),
    "pyramid+llrd": (
        {"lr_multipliers": PYRAMID, "llrd": 0.5},
        3,
        {
            "embeddings": 0.1 * 0.5**4,
            "block.0": 0.2 * 0.5**3,
            "block.1": 0.4 * 0.5**2,
            "block.2": 0.6 * 0.5,
            "head": 2.0,
        },
    ),
}


def _cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """The schedule written out: linear warmup from 1/warmup, then cosine to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("case", sorted(LR_CASES))
def test_lr_of_every_group_at_every_step(case, tiny_bert, tmp_path):
    shaping, layers, multipliers = LR_CASES[case]
    cfg = bert_config(
        tiny_bert,
        tmp_path,
        method={"name": "full", **shaping},
        optim={"lr": 1e-3, "scheduler": "cosine", "warmup_steps": 2, "weight_decay": 0.05},
        train={"max_steps": 6},
    )
    model = build_model("bert", layers)
    recorder = Recorder()
    trainer, method = make_trainer(cfg, bert_features(tiny_bert), tmp_path, model=model)
    recorder.attach(trainer)

    groups = {g.name: g.lr_multiplier for g in method.param_groups(trainer.model)}
    assert groups == pytest.approx(multipliers, rel=1e-12)
    by_id = {id(p): n for n, p in trainer.model.named_parameters()}
    names = set()
    for g in trainer.optimizer.param_groups:
        params = [by_id[id(p)] for p in g["params"]]
        names.update(params)
        if g["name"].endswith("/no_decay"):
            assert g["weight_decay"] == 0.0
            assert all(n.endswith(".bias") or ".LayerNorm." in n for n in params), params
        else:
            assert g["weight_decay"] == 0.05
            assert all(p.ndim == 2 for p in g["params"])
    assert names == set(by_id.values())
    assert {g["name"] for g in trainer.optimizer.param_groups} == {
        *multipliers,
        *(f"{g}/no_decay" for g in multipliers),
    }

    trainer.run()
    assert [u.step for u in recorder.updates] == list(range(6))
    for u in recorder.updates:
        factor = _cosine_with_warmup(u.step, total=6, warmup=2)
        for name, lr in u.lr.items():
            expected = 1e-3 * multipliers[name.removesuffix("/no_decay")] * factor
            assert lr == pytest.approx(expected, rel=1e-12, abs=0), (name, u.step)


def test_llrd_on_an_encoder_decoder_counts_each_stack_from_its_top():
    method = get_method(method_config(name="full", llrd=0.5))
    model = method.apply(build_model("t5", 3, decoder_layers=2))
    groups = {g.name: g.lr_multiplier for g in method.param_groups(model)}
    assert groups == pytest.approx(
        {
            "embeddings": 0.5**4,
            "encoder.block.0": 0.125,
            "encoder.block.1": 0.25,
            "encoder.block.2": 0.5,
            "decoder.block.0": 0.25,
            "decoder.block.1": 0.5,
            "head": 1.0,
        },
        rel=1e-12,
    )


def test_llrd_with_freeze_shapes_only_the_trained_groups():
    method = get_method(method_config(name="freeze", train_layers=1, llrd=0.1))
    model = method.apply(build_model("llama", 3))
    groups = {g.name: g.lr_multiplier for g in method.param_groups(model)}
    assert groups == pytest.approx({"block.2": 0.1, "head": 1.0}, rel=1e-12)
