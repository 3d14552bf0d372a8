"""Frozen-prefix feature cache: same gradients, same training, only where it is valid."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_bert
from helpers import LABELS, bert_config, bert_features, build_model, make_trainer
from tunesmith.config.root import Config
from tunesmith.data.batching import Collator, FeatureDataset
from tunesmith.errors import ConfigError
from tunesmith.methods.base import get_method
from tunesmith.models.loading import load_tokenizer
from tunesmith.tasks.base import get_task
from tunesmith.training.feature_cache import FeatureCache, frozen_prefix, plan_cache


def _freeze_top(model: torch.nn.Module, cfg) -> torch.nn.Module:
    return get_method(cfg).apply(model)


@pytest.fixture(scope="module")
def bert4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block tiny BERT with dropout, so eval and train mode differ."""
    return build_tiny_bert(tmp_path_factory.mktemp("bert4"), dropout=0.1, num_layers=4)


def _model_and_data(bert4: Path, tmp_path: Path, **method):
    cfg = bert_config(bert4, tmp_path, method={"name": "freeze", **method})
    tok = load_tokenizer(str(bert4))
    torch.manual_seed(0)
    model = get_method(cfg).apply(get_task(cfg).build_model(LABELS, tok))
    features = FeatureDataset(bert_features(bert4, n=24))
    return cfg, model, features


def test_frozen_prefix_counts_the_frozen_bottom_blocks(bert4: Path, tmp_path: Path) -> None:
    _, model, _ = _model_and_data(bert4, tmp_path, train_layers=2)
    assert frozen_prefix(model) == ("bert.embeddings", "bert.encoder.layer", 2)
    _, probe, _ = _model_and_data(bert4, tmp_path)  # head only: one block is kept running
    assert frozen_prefix(probe)[2] == 3
    _, bitfit, _ = _model_and_data(bert4, tmp_path, train_biases=True)
    assert "the embeddings train" in frozen_prefix(bitfit)


def test_frozen_prefix_refuses_models_it_cannot_replay() -> None:
    gpt2 = build_model("gpt2", layers=3)
    for name, p in gpt2.named_parameters():
        p.requires_grad = ".h.2." in name or name.startswith("score")
    assert "position added outside" in frozen_prefix(gpt2)
    t5 = build_model("t5", layers=2)
    assert "several block stacks" in frozen_prefix(t5)


def _grads(model: torch.nn.Module, batch: dict, seed: int, cache=None) -> dict[str, torch.Tensor]:
    """Gradients of one batch's loss, named as in the whole model."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "index")}
    with cache.replaying(model, batch) if cache is not None else nullcontext():
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits, batch["labels"])
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cached_gradients_equal_eval_mode_frozen_blocks(bert4: Path, tmp_path: Path) -> None:
    _, model, features = _model_and_data(bert4, tmp_path, train_layers=2)
    collator = Collator(0)
    cache = FeatureCache.build(model, features, collator, batch_size=5)
    batch = collator([features[i] for i in (3, 0, 17, 9, 22, 11)])
    model.train()
    cached = _grads(model, batch, seed=7, cache=cache)
    # Reference: the same model with its embeddings and bottom 2 blocks in eval mode.
    model.bert.embeddings.eval()
    for block in model.bert.encoder.layer[:2]:
        block.eval()
    reference = _grads(model, batch, seed=7)
    assert set(cached) == set(reference) and any("layer.2." in n for n in cached)
    assert not any("layer.0." in n or "layer.1." in n for n in cached)
    for name, grad in reference.items():
        torch.testing.assert_close(cached[name], grad, atol=1e-5, rtol=0, msg=name)
    # Dropout is live in the top: a different seed gives different gradients.
    other = _grads(model, batch, seed=8, cache=cache)
    assert any(not torch.allclose(other[n], reference[n], atol=1e-5) for n in reference)
    # The swap is undone: the model is whole again.
    assert len(model.bert.encoder.layer) == 4
    assert type(model.bert.embeddings).__name__ == "BertEmbeddings"


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_training_from_the_cache_equals_training_without(
    tiny_bert: Path, tmp_path: Path, where: str
) -> None:
    """No dropout: eval and train mode agree, so the cache must not change training."""
    features = bert_features(tiny_bert, n=32)
    finals = {}
    for mode in ("off", where):
        (tmp_path / mode).mkdir()
        cfg = bert_config(
            tiny_bert,
            tmp_path / mode,
            method={"name": "freeze", "train_layers": 1},
            train={"feature_cache": mode, "epochs": 2, "output_dir": str(tmp_path / mode)},
        )
        trainer, _ = make_trainer(cfg, features, tmp_path)
        assert (trainer.feature_cache is None) == (mode == "off")
        calls = []
        bottom = trainer.model.bert.encoder.layer[0]
        handle = bottom.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        trainer.run()
        handle.remove()
        assert bool(calls) == (mode == "off")  # cached: the bottom block never runs
        finals[mode] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        if mode == "disk":
            assert trainer.feature_cache.path.exists()
            trainer.release()
            assert not any((tmp_path / mode / ".cache").iterdir())
    for name, value in finals["off"].items():
        if name.endswith("key.bias"):
            # Softmax ignores a key bias: its gradient is 0 up to rounding noise, which
            # Adam scales up to a full step of either sign. Not a difference of the cache.
            continue
        torch.testing.assert_close(finals[where][name], value, atol=1e-5, rtol=0, msg=name)


def test_llama_prefix_is_cached_and_replays_exactly() -> None:
    model = build_model("llama", layers=3)
    for name, p in model.named_parameters():
        p.requires_grad = ".layers.2." in name or name.startswith("score")
    assert frozen_prefix(model) == ("model.embed_tokens", "model.layers", 2)
    features = FeatureDataset(
        [
            {"input_ids": [5 + i, 7, 9, 11][: 2 + i % 3], "attention_mask": [1] * (2 + i % 3)}
            for i in range(6)
        ]
    )
    cache = plan_cache(
        "memory", model, features, Collator(0), cacheable=True, batch_size=4, folder=None
    )
    assert cache is not None and cache.frozen == 2


def test_auto_skips_and_explicit_modes_refuse_when_nothing_is_frozen(
    tiny_bert: Path, tmp_path: Path
) -> None:
    cfg = bert_config(tiny_bert, tmp_path, method={"name": "full"})
    model = get_method(cfg).apply(get_task(cfg).build_model(LABELS, load_tokenizer(str(tiny_bert))))
    features = FeatureDataset(bert_features(tiny_bert, n=8))
    args = dict(cacheable=True, batch_size=4, folder=tmp_path)
    assert plan_cache("auto", model, features, Collator(0), **args) is None
    with pytest.raises(ConfigError, match=r"feature_cache=memory is impossible.*embeddings train"):
        plan_cache("memory", model, features, Collator(0), **args)
    for p in model.parameters():
        p.requires_grad = False
    with pytest.raises(ConfigError, match="method changes what the frozen blocks see"):
        plan_cache("disk", model, features, Collator(0), **{**args, "cacheable": False})


def test_prefix_tuning_and_progressive_unfreezing_never_cache(
    tiny_bert: Path, tmp_path: Path
) -> None:
    features = bert_features(tiny_bert, n=16)
    cfg = bert_config(tiny_bert, tmp_path, method={"name": "prefix", "num_virtual_tokens": 2})
    trainer, _ = make_trainer(cfg, features, tmp_path)
    assert trainer.feature_cache is None
    cfg = bert_config(
        tiny_bert,
        tmp_path,
        method={"name": "freeze", "unfreeze": {"every_steps": 1, "start_layers": 1}},
    )
    trainer, _ = make_trainer(cfg, features, tmp_path)
    assert trainer.feature_cache is None


def test_yaml_off_means_off(tiny_bert: Path, tmp_path: Path) -> None:
    """``train.feature_cache=off`` reaches YAML as false; it must not be an error."""
    cfg = bert_config(tiny_bert, tmp_path)
    assert (
        Config.from_dict(
            cfg.model_dump(), overrides=["train.feature_cache=off"]
        ).train.feature_cache
        == "off"
    )
