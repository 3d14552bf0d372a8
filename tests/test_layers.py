"""Layer discovery: embeddings, the ordered block list(s) and the head of common models.

Every architecture is a tiny random model built from its config (hidden 16,
2-3 blocks), so the tests need no download and run in milliseconds. The
expected groups are written out by hand from each model's parameter names,
not derived from the code under test.
"""

from __future__ import annotations

import pytest
from torch import nn

#: Vocabulary size of the tiny models (the conftest WordPiece vocabulary has 54 tokens).
from helpers import build_model
from tunesmith.errors import ConfigError
from tunesmith.models.layers import EMBEDDINGS, HEAD, LayerMap, discover_layers


def _names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def _in_group(layer_map: LayerMap, group: str) -> set[str]:
    return {n for n, g in layer_map.group_of.items() if g == group}


# What each architecture must look like; block groups hold everything under
# ``<stack>.<i>.`` plus the listed extras (final norms belong to the top block).
EXPECTED = {
    "bert": {
        "stacks": ["bert.encoder.layer"],
        "embeddings_prefix": ("bert.embeddings.",),
        "head": {
            "bert.pooler.dense.weight",
            "bert.pooler.dense.bias",
            "classifier.weight",
            "classifier.bias",
        },
        "top_extras": set(),
    },
    "distilbert": {
        "stacks": ["distilbert.transformer.layer"],
        "embeddings_prefix": ("distilbert.embeddings.",),
        "head": {
            "pre_classifier.weight",
            "pre_classifier.bias",
            "classifier.weight",
            "classifier.bias",
        },
        "top_extras": set(),
    },
    "llama": {
        "stacks": ["model.layers"],
        "embeddings_prefix": ("model.embed_tokens.",),
        "head": {"score.weight"},
        "top_extras": {"model.norm.weight"},
    },
    "gpt2": {
        "stacks": ["transformer.h"],
        "embeddings_prefix": ("transformer.wte.", "transformer.wpe."),
        "head": {"score.weight"},
        "top_extras": {"transformer.ln_f.weight", "transformer.ln_f.bias"},
    },
}


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_single_stack_models(kind, layers):
    model = build_model(kind, layers)
    exp = EXPECTED[kind]
    lm = discover_layers(model)
    blocks = [f"block.{i}" for i in range(layers)]
    assert lm.stacks == exp["stacks"]
    assert lm.blocks == [blocks]
    assert lm.groups == [EMBEDDINGS, *blocks, HEAD]

    names = _names(model)
    assert set(lm.group_of) == set(names), "every parameter is mapped, nothing else"
    stack = exp["stacks"][0]
    for i, block in enumerate(blocks):
        expected = {n for n in names if n.startswith(f"{stack}.{i}.")}
        if i == layers - 1:
            expected |= exp["top_extras"]
        assert expected, block
        assert _in_group(lm, block) == expected, block
    assert _in_group(lm, HEAD) == exp["head"]
    assert _in_group(lm, EMBEDDINGS) == {n for n in names if n.startswith(exp["embeddings_prefix"])}
    assert _in_group(lm, EMBEDDINGS)


def test_bert_pooler_is_head_and_llama_final_norm_is_top_block():
    bert = discover_layers(build_model("bert"))
    assert bert.group_of["bert.pooler.dense.weight"] == HEAD
    assert bert.group_of["bert.embeddings.LayerNorm.weight"] == EMBEDDINGS
    llama = discover_layers(build_model("llama", 3))
    assert llama.group_of["model.norm.weight"] == "block.2"
    assert llama.group_of["model.embed_tokens.weight"] == EMBEDDINGS
    assert llama.group_of["score.weight"] == HEAD


def test_t5_has_two_stacks():
    model = build_model("t5")
    lm = discover_layers(model)
    assert lm.stacks == ["transformer.encoder.block", "transformer.decoder.block"]
    enc, dec = ["encoder.block.0", "encoder.block.1"], ["decoder.block.0", "decoder.block.1"]
    assert lm.blocks == [enc, dec]
    assert lm.groups == [EMBEDDINGS, *enc, *dec, HEAD]
    names = _names(model)
    assert set(lm.group_of) == set(names)
    for side in ("encoder", "decoder"):
        for i in (0, 1):
            expected = {n for n in names if n.startswith(f"transformer.{side}.block.{i}.")}
            if i == 1:
                expected.add(f"transformer.{side}.final_layer_norm.weight")
            assert _in_group(lm, f"{side}.block.{i}") == expected
    # The relative position bias lives in block 0 of each stack.
    rel = "transformer.{}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert lm.group_of[rel.format("encoder")] == "encoder.block.0"
    assert lm.group_of[rel.format("decoder")] == "decoder.block.0"
    assert _in_group(lm, EMBEDDINGS) == {"transformer.shared.weight"}
    assert _in_group(lm, HEAD) == {n for n in names if n.startswith("classification_head.")}
    assert len(_in_group(lm, HEAD)) == 4


def test_top_blocks_cover_every_stack():
    lm = discover_layers(build_model("t5"))
    assert lm.top_blocks(0) == []
    assert lm.top_blocks(1) == ["encoder.block.1", "decoder.block.1"]
    assert sorted(lm.top_blocks(2)) == sorted(g for stack in lm.blocks for g in stack)
    bert = discover_layers(build_model("bert", 3))
    assert bert.top_blocks(1) == ["block.2"]
    assert bert.top_blocks(2) == ["block.1", "block.2"]
    assert bert.top_blocks(3) == ["block.0", "block.1", "block.2"]


def test_top_blocks_beyond_the_depth_is_every_block():
    lm = discover_layers(build_model("bert", 2))
    assert lm.top_blocks(3) == ["block.0", "block.1"]


def test_depth_and_position():
    lm = discover_layers(build_model("bert", 3))
    assert [lm.depth_from_top(g) for g in lm.groups] == [4, 3, 2, 1, 0]
    assert [lm.position(g) for g in ("block.0", "block.1", "block.2")] == [0.0, 0.5, 1.0]
    t5 = discover_layers(build_model("t5", 3, decoder_layers=2))
    assert t5.depth_from_top("encoder.block.0") == 3
    assert t5.depth_from_top("decoder.block.0") == 2
    assert t5.depth_from_top(EMBEDDINGS) == 4  # one below the deepest block
    assert t5.position("decoder.block.1") == 1.0
    assert t5.position("encoder.block.1") == 0.5


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)


class _Mixed(nn.Module):
    """Blocks of two different classes: introspection finds no uniform block list."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.stack = nn.ModuleList([_Attn(), _Mlp(), _Attn()])
        self.out = nn.Linear(8, 2)


def test_blocks_override_names_the_block_list():
    model = _Mixed()
    with pytest.raises(ConfigError, match=r"no list of transformer blocks found in _Mixed"):
        discover_layers(model)
    lm = discover_layers(model, ["stack"])
    assert lm.stacks == ["stack"]
    assert lm.blocks == [["block.0", "block.1", "block.2"]]
    assert lm.group_of == {
        "embed.weight": EMBEDDINGS,
        "stack.0.proj.weight": "block.0",
        "stack.0.proj.bias": "block.0",
        "stack.1.up.weight": "block.1",
        "stack.1.up.bias": "block.1",
        "stack.1.down.weight": "block.1",
        "stack.1.down.bias": "block.1",
        "stack.2.proj.weight": "block.2",
        "stack.2.proj.bias": "block.2",
        "out.weight": HEAD,
        "out.bias": HEAD,
    }


def test_blocks_override_on_a_transformers_model_matches_discovery():
    model = build_model("bert")
    assert discover_layers(model, ["bert.encoder.layer"]) == discover_layers(model)


def test_blocks_override_through_the_method_config(tmp_path):
    from tunesmith.config.root import Config
    from tunesmith.methods.base import get_method

    base = {
        "model": {"name_or_path": str(tmp_path)},
        "data": {"train": str(tmp_path / "x.csv")},
        "method": {"name": "freeze", "train_layers": 1, "blocks": ["stack"]},
    }
    method = get_method(Config.from_dict(base))
    model = method.apply(_Mixed())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"stack.2.proj.weight", "stack.2.proj.bias", "out.weight", "out.bias"}

    wrong = {**base, "method": {"name": "freeze", "blocks": ["stacks"]}}
    with pytest.raises(ConfigError, match=r"method\.blocks: 'stacks' is not a ModuleList"):
        get_method(Config.from_dict(wrong)).apply(_Mixed())


@pytest.mark.parametrize("path", ["bert.encoder.layers", "bert.encoder", "bert.encoder.layer.0"])
def test_wrong_block_path_is_a_config_error(path):
    with pytest.raises(ConfigError, match=rf"method\.blocks: '{path}' is not a ModuleList"):
        discover_layers(build_model("bert"), [path])


def test_model_without_blocks_is_a_config_error():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ConfigError) as info:
        discover_layers(model)
    message = str(info.value)
    assert "no list of transformer blocks found in Sequential" in message
    assert "method.blocks" in message  # says how to fix it


def test_small_side_lists_are_not_stacks():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.layers = nn.ModuleList([_Mlp() for _ in range(3)])
            self.gates = nn.ModuleList([nn.Linear(1, 1) for _ in range(3)])  # tiny
            self.out = nn.Linear(8, 2)

    lm = discover_layers(Model())
    assert lm.stacks == ["layers"]
    assert lm.group_of["gates.0.weight"] == HEAD  # after the blocks, outside their container
