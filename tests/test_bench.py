"""The HF-vs-tunesmith benchmark: is the comparison fair, and are its counters exact?

A benchmark is only as good as its fairness: both contenders must train the
same parameters and count the same tokens. Checked on a tiny random BERT with
4 blocks (so "top 2" is not "all"); one smoke run goes through the real
orchestration (a process per contender) on a few dozen rows.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import build_tiny_bert, toy_rows, write_csv
from tunesmith.data.batching import Collator
from tunesmith.studies import bench
from tunesmith.studies.bench import PAIRS, RunSpec, TokenCounter, flops_per_token, trainable_names

#: peft still reads a renamed transformers property (not what these tests are about).
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture(scope="module")
def bert4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT with 4 blocks."""
    return build_tiny_bert(tmp_path_factory.mktemp("bert4"), num_layers=4)


def spec(model: Path, pair: str) -> RunSpec:
    files = {s: f"{s}.jsonl" for s in ("train", "validation", "test")}  # not read here
    return RunSpec("hf", pair, str(model), files, ["neg", "pos"], lr=1e-3, max_length=32)


@pytest.mark.parametrize("pair", list(PAIRS))
def test_both_contenders_train_the_same_parameters(bert4: Path, pair: str, one_thread):
    hf_names = trainable_names(bench.hf_model(spec(bert4, pair)))
    ts_names = trainable_names(bench.tunesmith_model(spec(bert4, pair)))
    assert hf_names == ts_names
    if pair.startswith(
        "top2"
    ):  # the top 2 of 4 blocks, the pooler and the classifier; nothing else
        assert {n.split(".")[3] for n in hf_names if ".layer." in n} == {"2", "3"}
        assert any(n.startswith("bert.pooler.") for n in hf_names)
        assert not any(".layer.1." in n or "embeddings" in n for n in hf_names)
    if pair == "lora":
        assert all("lora_" in n or "classifier" in n for n in hf_names)
        assert any("query.lora_A" in n for n in hf_names)
        assert any("value.lora_B" in n for n in hf_names)


def test_token_counter_counts_exactly_the_non_pad_tokens():
    lengths = [3, 7, 1, 5]
    features = [{"input_ids": [5] * n, "attention_mask": [1] * n} for n in lengths]
    counter = TokenCounter(Collator(pad_token_id=0))
    counter(features[:2])
    counter(features[2:])
    assert counter.real == sum(lengths)
    assert counter.padded == 2 * 7 + 2 * 5
    assert counter.batches == 2


def test_flops_per_token_formula(bert4: Path, one_thread):
    """Full = 6N; top-2 = 2N + 4 N_top2 (less the lowest top-2 matmul's activation gradient)."""
    block = 4 * 32 * 32 + 2 * 32 * 64  # the Linear weights of one tiny block
    n = 4 * block
    full = flops_per_token(bench.hf_model(spec(bert4, "full")))
    assert full == 6 * n
    top2 = flops_per_token(bench.hf_model(spec(bert4, "top2")))
    assert top2 == 2 * n + 4 * 2 * block - 2 * 32 * 32  # the query of block 2 needs no input grad
    lora = flops_per_token(bench.hf_model(spec(bert4, "lora")))
    assert 4 * n < lora < full


def test_grouped_padding_replays_the_sampler():
    from tunesmith.data.batching import EpochSampler, padded_tokens

    lengths = [1, 9, 2, 8, 3, 7, 4, 6] * 4  # 16 batches of 2: windows of 4 batches
    exact = bench.grouped_padded_tokens(lengths, 2, seed=0, epochs=1)
    assert exact == padded_tokens(EpochSampler(lengths, 2, window=4).order(), lengths, 2)
    shuffled = padded_tokens(EpochSampler(lengths, 2, group_by_length=False).order(), lengths, 2)
    assert exact < shuffled
    # Labels that follow the length turn the run's grouping off: random batches' padding.
    labels = ["long" if n > 5 else "short" for n in lengths]
    assert bench.grouped_padded_tokens(lengths, 2, seed=0, epochs=1, labels=labels) == shuffled


def test_matmul_peak_is_a_rate(one_thread):
    assert bench.matmul_peak_flops(n=64, reps=2) > 1e6


def test_smoke_run_of_the_orchestration(tmp_path: Path, capsys):
    """One pair end to end: two processes, JSON results, both tables."""
    model = build_tiny_bert(tmp_path / "bert", num_layers=4)
    data = {
        "train": str(write_csv(tmp_path / "toy.csv", toy_rows(120))),
        "max_length": 32,
        "validation_fraction": 0.2,
        "test_fraction": 0.2,
    }
    out = tmp_path / "results.json"
    results = bench.run_benchmark(
        str(model), data, ["top2"], tmp_path / "work", rows=48, out=out, threads=1, matmul_size=256
    )
    entry = results["pairs"]["top2"]
    for who in bench.CONTENDERS:
        assert "error" not in entry[who], entry[who]
        assert entry[who]["real_tokens"] == entry["expected_real_tokens"]
        assert entry[who]["samples"] == 48 and entry[who]["steps"] == 3
        assert entry[who]["peak_rss_mb"] > 50 and 0 <= entry[who]["test_accuracy"] <= 1
        # VmHWM includes the current RSS, which Linux counts per thread and settles
        # later: a later reading of the peak may come out a fraction of a MB lower.
        assert entry[who]["peak_rss_mb"] >= entry[who]["train_peak_rss_mb"] - 1 > 50
    assert entry["same_trainable_names"]
    assert entry["hf"]["trainable_parameters"] == entry["tunesmith"]["trainable_parameters"]
    keys = {"tokens_per_s", "train_seconds", "train_peak_rss_mb", "peak_rss_mb", "accuracy_points"}
    assert set(entry["ratios"]) == keys and set(entry["ratios_grouped"]) == keys
    # HF at its best: never more padding (HF's window is one batch on data this small:
    # at least 4 windows per epoch, so here the batches are only reordered).
    assert entry["hf_grouped"]["padded_tokens"] <= entry["hf"]["padded_tokens"]
    assert entry["tunesmith"]["padded_tokens"] >= entry["expected_real_tokens"]
    assert json.loads(out.read_text())["pairs"]["top2"]["lr"] == PAIRS["top2"][1]
    assert entry["epochs"] == 1
    table = bench.format_tables(results)
    assert "| top2 | HF Trainer |" in table and "| top2 | tunesmith |" in table
    assert "| top2 | tunesmith | HF Trainer, length-grouped | 1 |" in table
    assert "matmul peak" in capsys.readouterr().out


def test_tables_show_failures_without_claiming_a_match():
    ok = {"train_seconds": 2.0, "real_tokens": 100, "padded_tokens": 125, "samples": 8}
    ok |= {"train_peak_rss_mb": 400.0, "peak_rss_mb": 500.0, "test_accuracy": 0.75}
    ok |= {"load_average_1m": 1.5}
    entry = {"lr": 1e-3, "epochs": 1, "same_trainable_names": True, "flops_per_token": 6e6}
    entry |= {"expected_real_tokens": 100, "hf": dict(ok), "tunesmith": {"error": "boom"}}
    bench.add_rates(entry, peak=1e9)
    assert entry["hf"]["tokens_per_s"] == 50 and entry["hf"]["peak_fraction"] == 0.3
    table = bench.format_tables({"matmul_peak_flops": 1e9, "pairs": {"lora": entry}})
    assert (
        "| lora | HF Trainer | 2.0 | 50 | 4.0 | 400 / 500 | 20% | 75.0% | 0.3 | 30% | 1.5 |"
        in table
    )
    assert "| lora | tunesmith | failed: boom |" in table
    assert "| lora | tunesmith | HF Trainer | 1 | 0.001 | - | - | - | - | yes | - |" in table
    assert "precision auto" not in table  # that arm ran nowhere here


def test_the_precision_auto_arm_runs_only_with_native_bf16(monkeypatch):
    """On a CPU without native bf16, ``auto`` is fp32: the arm would repeat the fp32 one."""
    from tunesmith.studies.bench import contenders

    monkeypatch.setattr(contenders, "cpu_bf16_native", lambda: False)
    assert contenders.contenders_here() == bench.CONTENDERS
    monkeypatch.setattr(contenders, "cpu_bf16_native", lambda: True)
    assert contenders.contenders_here() == (*bench.CONTENDERS, contenders.AUTO)
    spec = RunSpec(contenders.AUTO, "full", "m", {"train": "t.csv"}, ["a", "b"], 1e-3)
    assert contenders.tunesmith_settings(spec)["train"]["precision"] == "auto"
    fp32 = contenders.tunesmith_settings(replace(spec, contender="tunesmith"))
    assert fp32["train"]["precision"] == "fp32"


def test_the_precision_auto_arm_is_compared_with_hf_defaults():
    ok = {"train_seconds": 2.0, "real_tokens": 100, "padded_tokens": 125, "samples": 8}
    ok |= {"train_peak_rss_mb": 400.0, "peak_rss_mb": 500.0, "test_accuracy": 0.75}
    entry = {"lr": 1e-3, "epochs": 1, "same_trainable_names": True, "flops_per_token": 6e6}
    entry |= {"expected_real_tokens": 100, "hf": dict(ok), "tunesmith": dict(ok)}
    entry["tunesmith_auto"] = ok | {"train_seconds": 1.0, "test_accuracy": 0.76}
    bench.add_rates(entry, peak=1e9)
    assert entry["ratios_auto"]["tokens_per_s"] == 2.0
    assert entry["ratios_auto"]["accuracy_points"] == pytest.approx(1.0)
    table = bench.format_tables({"matmul_peak_flops": 1e9, "pairs": {"full": entry}})
    assert "| full | tunesmith, precision auto (bf16) | HF Trainer | 1 | 0.001 | 2.00x |" in table


def test_unknown_pair_is_rejected(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--pairs", "full,bogus"])
    assert "unknown pair" in capsys.readouterr().err
