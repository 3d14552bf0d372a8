"""Shared-private multi-task training: a private bottleneck adapter per task and block.

The method adapts the shared encoder (full, LoRA, our bottleneck adapters);
``multitask.task_adapters`` adds each task's own adapters, which only that
task's batches run and train, and which are saved with the task's head.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from helpers import PEFT_TEST_MARKS
from test_multitask import mt_bert, mt_config, mt_data  # fixtures and config
from tunesmith.api import evaluate, train
from tunesmith.config.root import Config
from tunesmith.data.batching import Collator, FeatureDataset
from tunesmith.errors import ConfigError, ModelError
from tunesmith.methods.base import get_method
from tunesmith.models.folders import read_manifest
from tunesmith.models.loading import load_tokenizer
from tunesmith.runs.load import load_trained
from tunesmith.tasks.base import get_task
from tunesmith.tasks.inference import predict_dataset
from tunesmith.tasks.multitask_model import unwrap

pytestmark = PEFT_TEST_MARKS
__all__ = ["mt_bert", "mt_data"]

LABELS = ["sentiment/neg", "sentiment/pos", "ner/O", "ner/B-LOC", "ner/I-LOC", "ner/B-PER"]
TEXTS = ["alice visited paris today !", "a really dull plot"]


def sp_config(model: Path, data: dict[str, Path], out: Path, method: dict, **mt: object) -> Config:
    cfg = mt_config(model, data, out, method=method)
    cfg["multitask"] |= {"task_adapters": True, "adapter_reduction": 4, **mt}
    return Config.from_dict(cfg)


def build(cfg: Config):
    """Task, tokenizer, method and the method-adapted model, seeded."""
    task, tokenizer = get_task(cfg), load_tokenizer(cfg.model.name_or_path)
    method = get_method(cfg)
    set_seed(0)
    return task, tokenizer, method, method.apply(task.build_model(LABELS, tokenizer))


def logits_per_task(task, tokenizer, model) -> dict[str, torch.Tensor]:
    records = task.text_records(TEXTS)
    features = FeatureDataset(task.encode(records, tokenizer, None))
    preds = predict_dataset(task, model.eval(), features, Collator(0), 8)[0]
    return {k: v for k, v in preds.items() if "/" in k and v.is_floating_point()}


def test_untrained_task_adapters_are_the_identity(mt_bert, mt_data, tmp_path):
    """Adapters start with ``up`` at zero: the same outputs as the model without them."""
    plain = Config.from_dict(mt_config(mt_bert, mt_data, tmp_path))
    shared = sp_config(mt_bert, mt_data, tmp_path, {"name": "full"})
    without, with_adapters = (logits_per_task(*build(c)[:2], build(c)[3]) for c in (plain, shared))
    assert without.keys() == with_adapters.keys()
    assert {k.split("/")[0] for k in without} == {"sentiment", "ner"}
    for key, value in without.items():
        torch.testing.assert_close(with_adapters[key], value, rtol=0, atol=1e-6)
    model = build(shared)[3]
    names = [n for n, _ in model.named_parameters() if n.startswith("task_adapters.")]
    # 2 tasks x 2 blocks x (down, up) x (weight, bias)
    assert len(names) == 16 and "task_adapters.by_task.ner.1.up.weight" in names


def test_a_batch_trains_only_its_own_tasks_adapters(mt_bert, mt_data, tmp_path):
    cfg = sp_config(mt_bert, mt_data, tmp_path, {"name": "lora", "r": 4})
    task, tokenizer, _, model = build(cfg)
    inner = unwrap(model)
    live = inner.live_adapters()
    assert live is not inner.task_adapters  # peft trains a copy (modules_to_save)
    for p in live.parameters():
        assert p.requires_grad
        with torch.no_grad():
            p.add_(torch.randn_like(p) * 0.1)  # so every adapter parameter gets a gradient
    records = [{"text": "the film was awful", "label": "neg", "task": "sentiment"}] * 2
    features = task.encode(records, tokenizer, {lab: i for i, lab in enumerate(LABELS)})
    batch = Collator(0)(features)
    out = model(**task.model_inputs(batch))
    task.loss_sum(out, batch).backward()
    for name, p in live.by_task["sentiment"].named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in live.by_task["ner"].parameters())
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(("lora_" in n) or (".modules_to_save." in n) for n in trained), trained


@pytest.mark.parametrize(
    "method",
    [{"name": "full"}, {"name": "lora", "r": 4}, {"name": "bottleneck", "reduction_factor": 4}],
    ids=["full", "lora", "bottleneck"],
)
def test_save_and_reload_are_exact(method, mt_bert, mt_data, tmp_path):
    cfg = sp_config(mt_bert, mt_data, tmp_path / "run", method)
    task, tokenizer, method_, model = build(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    task.save_weights(method_, model, tmp_path / "saved")
    head_file = load_file(str(tmp_path / "saved" / "heads" / "ner.safetensors"))
    assert "adapter.0.down.weight" in head_file and "classifier.weight" in head_file
    encoder_files = list((tmp_path / "saved" / "encoder").glob("*.safetensors"))
    assert len(encoder_files) == 1
    assert not any("task_adapters" in k for k in load_file(str(encoder_files[0])))
    reloaded = load_trained(task, str(tmp_path / "saved"), LABELS, tokenizer)
    mine, theirs = (logits_per_task(task, tokenizer, m) for m in (model, reloaded))
    for key, value in mine.items():
        torch.testing.assert_close(theirs[key], value, rtol=0, atol=1e-6)
    # The saved adapters matter: without them the outputs differ.
    plain = get_task(Config.from_dict(mt_config(mt_bert, mt_data, tmp_path / "x", method=method)))
    with pytest.raises(ModelError, match="private adapters"):
        load_trained(plain, str(tmp_path / "saved"), LABELS, tokenizer)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_shared_private_training_learns_and_evaluates_again(method, mt_bert, mt_data, tmp_path):
    """Both tasks learn with full; with LoRA the shared base stays exactly as loaded.

    (LoRA on this tiny random BERT does not learn the toy sentiment task with or
    without task adapters: its frozen random pooler feeds the sentiment head.)
    """
    spec = {"name": "lora", "r": 4} if method == "lora" else {"name": "full"}
    cfg = sp_config(mt_bert, mt_data, tmp_path / "run", spec)
    cfg = Config.from_dict({**cfg.model_dump(), "optim": {**cfg.optim.model_dump(), "lr": 1e-2}})
    set_seed(0)
    start = get_task(cfg).build_model(LABELS, load_tokenizer(str(mt_bert)))
    initial = {k: v.clone() for k, v in start.encoder.state_dict().items()}
    result = train(cfg, progress=False)
    test = result.test_metrics
    assert test["ner/entity_f1"] >= 0.9, test
    if method == "full":
        assert test["sentiment/accuracy"] >= 0.9, test
    trainable = {row["group"]: row["trainable"] for row in result.parameters}
    assert trainable["head"] > 0 and (trainable["embeddings"] > 0) == (method == "full")
    for name in ("sentiment", "ner"):
        saved = load_file(str(result.best_dir / "heads" / f"{name}.safetensors"))
        assert saved["adapter.1.up.weight"].abs().max() > 0  # moved from its zero start
    if method == "lora":  # only the adapter files hold new weights
        reloaded = load_trained(
            get_task(cfg), str(result.best_dir), LABELS, load_tokenizer(str(mt_bert))
        )
        state = unwrap(reloaded).encoder.state_dict()
        for key, value in initial.items():
            base_key = key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]
            got = state.get(key, state.get(base_key))
            assert got is not None, key
            torch.testing.assert_close(got, value, rtol=0, atol=0)
    again = evaluate(result.best_dir, split="validation")
    for key, value in read_manifest(result.best_dir)["validation"].items():
        assert again[key] == pytest.approx(value, abs=1e-6), key


def test_bad_reduction_is_a_config_error(mt_bert, mt_data, tmp_path):
    cfg = sp_config(mt_bert, mt_data, tmp_path, {"name": "full"}, adapter_reduction=10_000)
    with pytest.raises(ConfigError, match="adapter_reduction"):
        get_task(cfg).build_model(LABELS, load_tokenizer(str(mt_bert)))
