"""Multi-task training: sampling, the weighted loss, both heads training, saving and reloading.

The tiny BERT here knows the words of both toy tasks: sentiment sentences
(``conftest.toy_rows``) and tagged sentences about people and cities
(``test_ner.ner_sentences``), so one shared encoder can learn both.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from conftest import FILLER, NEGATIVE, POSITIVE, SPECIAL, build_tiny_bert, toy_rows, write_csv
from helpers import PEFT_TEST_MARKS, cli_fails
from test_ddp import TORCHRUN
from test_ner import FILLER as NER_FILLER
from test_ner import LETTERS, PEOPLE, PIECES, ner_config, ner_sentences, write_conll
from tunesmith.api import evaluate, predict, train
from tunesmith.cli import main
from tunesmith.config.root import Config
from tunesmith.data.batching import Collator, FeatureDataset
from tunesmith.data.task_sampler import TaskBatchSampler, batch_quotas, mixing_rates
from tunesmith.errors import ConfigError
from tunesmith.methods.base import get_method
from tunesmith.models.folders import read_manifest
from tunesmith.models.loading import load_tokenizer
from tunesmith.runs.load import load_trained
from tunesmith.tasks.base import get_task
from tunesmith.tasks.inference import predict_dataset

pytestmark = PEFT_TEST_MARKS


# -- fixtures -------------------------------------------------------------------
def build_mt_bert(folder: Path) -> Path:
    """A random 2-layer BERT whose vocabulary covers both toy tasks."""
    words = sorted(set(POSITIVE + NEGATIVE + FILLER)) + PEOPLE + NER_FILLER + PIECES + LETTERS
    vocab = list(dict.fromkeys(SPECIAL + words + ["##" + c for c in LETTERS]))
    return build_tiny_bert(folder, vocab=vocab)


@pytest.fixture(scope="module")
def mt_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mt_bert(tmp_path_factory.mktemp("mt-bert"))


@pytest.fixture(scope="module")
def mt_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("mt-data")
    return {
        "sentiment": write_csv(folder / "sentiment.csv", toy_rows(240)),
        "ner": write_conll(folder / "ner.conll", ner_sentences(200)),
    }


def mt_config(model: Path, data: dict[str, Path], out: Path, **sections: dict) -> dict:
    """Sentiment + NER on the tiny BERT (training settings as ``ner_config``'s)."""
    cfg = ner_config(model, Path("unused"), out, **sections)
    del cfg["data"]["train"]  # the rest of data: defaults shared by both tasks
    cfg["task"] = {"type": "multitask"}
    cfg["multitask"] = {
        "sampling": "uniform",
        "tasks": {
            "sentiment": {
                "type": "sequence_classification",
                "data": {"train": str(data["sentiment"])},
            },
            "ner": {"type": "token_classification", "data": {"train": str(data["ner"])}},
        },
    }
    return cfg


@pytest.fixture(scope="module")
def full_run(mt_bert: Path, mt_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("mt-full") / "run"
    return train(Config.from_dict(mt_config(mt_bert, mt_data, out)), progress=False)


# -- sampling -------------------------------------------------------------------
def make_sampler(sizes: list[int], batch_size: int, sampling: str, **kw) -> TaskBatchSampler:
    task_ids = [t for t, n in enumerate(sizes) for _ in range(n)]
    lengths = [5 + (i * 7) % 23 for i in range(len(task_ids))]
    rates = mixing_rates(sizes, sampling, kw.pop("temperature", 2.0))
    return TaskBatchSampler(task_ids, lengths, batch_size, rates=rates, **kw)


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        ("proportional", [0.6, 0.3, 0.1]),
        ("uniform", [1 / 3, 1 / 3, 1 / 3]),
        (
            "temperature",
            [v / sum(math.sqrt(n) for n in (6, 3, 1)) for v in map(math.sqrt, (6, 3, 1))],
        ),
    ],
)
def test_sampling_proportions_hold_over_1000_draws(sampling: str, expected: list[float]):
    sizes = [2400, 1200, 400]
    sampler = make_sampler(sizes, 4, sampling, seed=3)
    assert sampler.batches_per_epoch == 1000
    draws: list[int] = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        draws += sampler.task_of_batches()
    counts = Counter(draws)
    for task, rate in enumerate(expected):
        assert counts[task] / len(draws) == pytest.approx(rate, abs=0.005), (task, counts)
    # Mixed, not blocked: the first 50 batches already hold every task.
    assert set(draws[:50]) == {0, 1, 2}


def test_batches_are_single_task_full_and_line_up_with_the_loader():
    sizes = [37, 21]
    sampler = make_sampler(sizes, 4, "proportional", seed=1)
    task_of = [t for t, n in enumerate(sizes) for _ in range(n)]
    loader = DataLoader(list(range(sum(sizes))), batch_size=4, sampler=sampler)
    batches = [b.tolist() for b in loader]
    assert len(batches) == math.ceil(58 / 4) == len(sampler) // 4
    assert all(len(b) == 4 and len({task_of[i] for i in b}) == 1 for b in batches)
    lengths = sampler.lengths  # the longest batch comes first (fails fast on memory)
    assert max(lengths[i] for i in batches[0]) == max(lengths[i] for b in batches for i in b)


def test_order_depends_only_on_seed_and_epoch():
    first = make_sampler([30, 10], 4, "uniform", seed=7)
    for epoch in range(4):  # history: earlier epochs were drawn
        first.set_epoch(epoch)
        first.order()
    fresh = make_sampler([30, 10], 4, "uniform", seed=7)
    fresh.set_epoch(3)
    assert fresh.order() == first.order()
    fresh.set_epoch(2)
    assert fresh.order() != first.order()
    other = make_sampler([30, 10], 4, "uniform", seed=8)
    other.set_epoch(3)
    assert other.order() != first.order()


def test_every_example_is_used_evenly_over_epochs():
    # uniform on 90 + 10 examples, batches of 2: 25 batches each per epoch, so the small
    # task cycles 5 times per epoch and the large one finishes a pass every 9 epochs.
    sampler = make_sampler([90, 10], 2, "uniform", seed=0, group_by_length=False)
    assert sampler.quotas == [25, 25]
    seen: Counter[int] = Counter()
    for epoch in range(9):
        sampler.set_epoch(epoch)
        seen.update(sampler.order())
    assert {seen[i] for i in range(90)} == {5}
    assert {seen[i] for i in range(90, 100)} == {45}


def test_mixing_rates_and_quotas():
    assert mixing_rates([300, 100], "temperature", 1.0) == pytest.approx([0.75, 0.25])
    assert mixing_rates([300, 100], "temperature", 1e6) == pytest.approx([0.5, 0.5], abs=1e-5)
    assert mixing_rates([300, 0], "uniform") == [1.0, 0.0]
    assert batch_quotas([0.5, 0.3, 0.2], 7) == [4, 2, 1]
    assert sum(batch_quotas([1 / 3] * 3, 10)) == 10
    with pytest.raises(ValueError, match="no task has training examples"):
        mixing_rates([0, 0], "proportional")


# -- the loss ---------------------------------------------------------------------
def test_loss_is_the_weighted_mean_of_each_batch(mt_bert, mt_data, tmp_path):
    cfg = mt_config(mt_bert, mt_data, tmp_path / "run")
    cfg["multitask"]["tasks"]["ner"]["weight"] = 2.5
    task = get_task(Config.from_dict(cfg))
    logits = torch.randn(3, 4, 5)
    labels = torch.tensor([[1, -100, 2, 0], [4, 4, -100, -100], [0, 1, 2, 3]])
    batch = {"task_id": torch.tensor([1, 1, 1]), "labels": labels, "input_ids": labels.clamp(0)}
    outputs = type("Out", (), {"logits": logits})()
    expected = 2.5 * F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert task.loss_sum(outputs, batch) == pytest.approx(float(expected), rel=1e-6)
    assert int(task.count_targets(batch)) == 1  # the loop then averages over micro-batches
    assert "task_id" in task.model_inputs(batch) and "labels" not in task.model_inputs(batch)


# -- training, saving, reloading ---------------------------------------------------------
def test_both_heads_train(full_run, mt_bert, mt_data):
    test = full_run.test_metrics
    assert test["sentiment/accuracy"] >= 0.9 and test["ner/entity_f1"] >= 0.9, test
    assert test["average"] == pytest.approx(
        (test["sentiment/accuracy"] + test["ner/entity_f1"]) / 2
    )
    # Both heads moved away from their initial weights (rebuilt with the run's seed).
    from accelerate.utils import set_seed

    cfg = Config.from_dict(mt_config(mt_bert, mt_data, Path("unused")))
    set_seed(cfg.train.seed)
    labels = read_manifest(full_run.best_dir)["labels"]
    initial = get_task(cfg).build_model(labels, load_tokenizer(str(mt_bert)))
    for name in ("sentiment", "ner"):
        trained = load_file(str(full_run.best_dir / "heads" / f"{name}.safetensors"))
        start = initial.heads.by_task[name].state_dict()
        assert (trained["classifier.weight"] - start["classifier.weight"]).abs().max() > 0.01
    log = [json.loads(line) for line in (full_run.output_dir / "metrics.jsonl").open()]
    validation = [r for r in log if r["split"] == "validation"]
    assert validation[-1]["loss"] < validation[0]["loss"]
    assert {"average", "sentiment/loss", "ner/entity_f1"} <= set(validation[0])


def test_saving_writes_the_encoder_once_plus_each_head(full_run):
    best = full_run.best_dir
    assert sorted(p.name for p in (best / "heads").iterdir()) == [
        "ner.safetensors",
        "sentiment.safetensors",
    ]
    assert (best / "encoder" / "config.json").is_file()
    assert [p.name for p in best.rglob("*.safetensors") if p.parent.name != "heads"] == [
        "model.safetensors"
    ]
    with safe_open(str(best / "heads" / "ner.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["type"] == "token_classification"
    assert json.loads(meta["labels"]) == ["O", "B-LOC", "I-LOC", "B-PER"]
    manifest = read_manifest(best)
    assert manifest["labels"] == [
        "sentiment/neg",
        "sentiment/pos",
        *(f"ner/{t}" for t in json.loads(meta["labels"])),
    ]
    assert manifest["weights_mb"] > 0
    from transformers import AutoModel

    assert type(AutoModel.from_pretrained(str(best / "encoder"))).__name__ == "BertModel"


def test_reloading_gives_identical_predictions_per_task(full_run):
    best = full_run.best_dir
    saved = read_manifest(best)["validation"]  # computed by the live model before saving
    again = evaluate(best, split="validation", batch_size=32)
    for key, value in saved.items():
        assert again[key] == pytest.approx(value, abs=1e-6), key
    texts = ["alice lives in paris .", "the film was awful", "bob met carol in new york"]
    rows = predict(best, texts)
    assert rows == predict(best, texts)
    assert [r["text"] for r in rows] == texts
    assert rows[1]["sentiment"]["label"] == "neg"
    assert [e["text"] for e in rows[0]["ner"]["entities"]] == ["alice", "paris"]


@pytest.mark.parametrize("method", ["full", "freeze", "lora"])
def test_save_and_reload_are_exact_for_each_method(method, mt_bert, mt_data, tmp_path):
    """Weights perturbed at random, saved, loaded: every head gives the same logits."""
    extra = {"train_layers": 1} if method == "freeze" else {}
    cfg = Config.from_dict(mt_config(mt_bert, mt_data, tmp_path, method={"name": method, **extra}))
    task, tokenizer = get_task(cfg), load_tokenizer(str(mt_bert))
    labels = ["sentiment/neg", "sentiment/pos", "ner/O", "ner/B-LOC", "ner/I-LOC", "ner/B-PER"]
    method_ = get_method(cfg)
    model = method_.apply(task.build_model(labels, tokenizer))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    task.save_weights(method_, model, tmp_path)
    reloaded = load_trained(task, str(tmp_path), labels, tokenizer)
    model.eval()
    records = task.text_records(["alice visited paris today !", "a really dull plot"])
    features = FeatureDataset(task.encode(records, tokenizer, None))
    for mine, theirs in zip(
        *(predict_dataset(task, m, features, Collator(0), 8)[0].items() for m in (model, reloaded)),
        strict=True,
    ):
        assert mine[0] == theirs[0]
        torch.testing.assert_close(mine[1], theirs[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["freeze", "lora"])
def test_methods_train_only_their_parameters_plus_every_head(method, mt_bert, mt_data, tmp_path):
    extra = {"train_layers": 1} if method == "freeze" else {"r": 4}
    cfg = mt_config(mt_bert, mt_data, tmp_path / "run", method={"name": method, **extra})
    cfg["train"]["epochs"] = 2
    cfg["optim"]["lr"] = 1e-2
    result = train(Config.from_dict(cfg), progress=False)
    trainable = {row["group"]: row["trainable"] for row in result.parameters}
    assert trainable["head"] > 0 and trainable["block.1"] > 0
    assert trainable["embeddings"] == 0 and (method == "lora") == (trainable["block.0"] > 0)
    saved = read_manifest(result.best_dir)
    names = {p.name for p in (result.best_dir / "encoder").iterdir()}
    assert names == (
        {"adapter_model.safetensors", "adapter_config.json"}
        if method == "lora"
        else {"model.safetensors", "config.json"}
    )
    assert saved["adapter"] == (method == "lora")
    again = evaluate(result.best_dir, split="validation")
    for key, value in saved["validation"].items():
        assert again[key] == pytest.approx(value, abs=1e-6), key


def test_resume_continues_the_task_schedule_exactly(mt_bert, mt_data, tmp_path):
    cfg = mt_config(mt_bert, mt_data, tmp_path / "run")
    cfg["train"].update(max_steps=10, save_steps=4, save_total_limit=3, eval_steps=100)
    result = train(Config.from_dict(cfg), progress=False)
    reference = {n: load_file(str(result.final_dir / "heads" / n)) for n in ("ner.safetensors",)}
    encoder = load_file(str(result.final_dir / "encoder" / "model.safetensors"))
    train(
        Config.from_dict(cfg),
        progress=False,
        resume=result.output_dir / "checkpoints" / "step-0000004",
    )
    resumed = load_file(str(result.final_dir / "encoder" / "model.safetensors"))
    for key, value in encoder.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)
    heads = load_file(str(result.final_dir / "heads" / "ner.safetensors"))
    torch.testing.assert_close(heads, reference["ner.safetensors"], rtol=0, atol=1e-6)


@pytest.mark.slow  # two fresh processes: ~30 s of start-up alone on 2 cores
@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed")
def test_two_processes_train_with_a_head_idle_per_batch(mt_bert, mt_data, tmp_path):
    """DDP: a step on one process may use the other head only (find_unused_parameters)."""
    cfg = mt_config(mt_bert, mt_data, tmp_path / "run")
    cfg["train"].update(max_steps=4, batch_size=4, num_threads=1, save_minutes=None)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "tunesmith", "train"]
    done = subprocess.run(
        [*command, str(path), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run" / "final" / "heads").iterdir()) == [
        "ner.safetensors",
        "sentiment.safetensors",
    ]


def test_cli_eval_and_predict_show_every_task(full_run, capsys):
    assert main(["eval", str(full_run.best_dir), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "average" in out and "sentiment/accuracy" in out and "ner/entity_f1" in out
    assert "sentiment/f1/pos" not in out
    assert main(["predict", str(full_run.best_dir), "--text", "bob visited berlin"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert set(row) == {"text", "sentiment", "ner"}
    cli_fails(
        capsys, ["eval", str(full_run.best_dir), "--data", "x.csv"], "--split validation|test"
    )


# -- config -------------------------------------------------------------------------
def config_error(cfg: dict) -> str:
    with pytest.raises(ConfigError) as info:
        Config.from_dict(cfg)
    return str(info.value)


def test_config_errors_name_the_key(mt_bert, mt_data, tmp_path):
    base = mt_config(mt_bert, mt_data, tmp_path)
    cfg = json.loads(json.dumps(base))
    del cfg["multitask"]["tasks"]["ner"]["data"]["train"]
    assert "missing required key 'multitask.tasks.ner.data.train'" in config_error(cfg)
    cfg = json.loads(json.dumps(base))
    cfg["multitask"]["tasks"]["ner"]["data"]["tag_column"] = "x"
    assert "unknown key 'multitask.tasks.ner.data.tag_column' (did you mean" in config_error(cfg)
    cfg = json.loads(json.dumps(base))
    cfg["multitask"]["tasks"]["ner"]["type"] = "seq2seq"
    assert "multitask.tasks.ner.type: unknown multi-task head type" in config_error(cfg)
    cfg = json.loads(json.dumps(base))
    cfg["multitask"]["tasks"]["bad-name"] = cfg["multitask"]["tasks"].pop("ner")
    assert "multitask.tasks: task name 'bad-name'" in config_error(cfg)
    cfg = json.loads(json.dumps(base))
    cfg["data"]["train"] = "shared.csv"
    assert "data.train: with task.type multitask" in config_error(cfg)
    assert "method.name: 'prefix' is not available" in config_error(
        {**base, "method": {"name": "prefix"}}
    )
    cfg = json.loads(json.dumps(base))
    cfg["train"]["feature_cache"] = "memory"
    assert "train.feature_cache: 'memory' is not available" in config_error(cfg)
    cfg = json.loads(json.dumps(base))
    cfg["task"]["type"] = "sequence_classification"
    assert "multitask.tasks: only read with task.type multitask" in config_error(cfg)


def test_config_shares_data_defaults_and_resolves_task_paths(mt_bert, mt_data, tmp_path, capsys):
    for path in mt_data.values():
        shutil.copy(path, tmp_path / path.name)
    cfg = mt_config(mt_bert, {n: Path(p.name) for n, p in mt_data.items()}, tmp_path / "run")
    cfg["multitask"]["tasks"]["ner"]["data"]["max_length"] = 48
    (tmp_path / "mt.yaml").write_text(yaml.safe_dump(cfg))
    loaded = Config.load(tmp_path / "mt.yaml", ["multitask.tasks.sentiment.weight=2"])
    sentiment, ner = loaded.multitask.tasks["sentiment"], loaded.multitask.tasks["ner"]
    assert sentiment.data.train == str(tmp_path / "sentiment.csv")  # next to the config
    assert (sentiment.data.max_length, ner.data.max_length) == (32, 48)  # shared, own wins
    assert sentiment.weight == 2.0 and loaded.eval.metric == "average"
    assert main(["config", "show", str(tmp_path / "mt.yaml")]) == 0
    shown = Config.from_dict(yaml.safe_load(capsys.readouterr().out))
    assert shown == Config.load(tmp_path / "mt.yaml")  # the resolved config reloads as is
