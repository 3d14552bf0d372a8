"""The evaluator: latency probe, peak memory, and the full evaluation of a checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import toy_rows, write_csv
from helpers import cli_fails
from tunesmith.cli import main
from tunesmith.evaluation import memory
from tunesmith.evaluation.evaluator import (
    EVALUATION_FILE,
    EvalOptions,
    evaluate_checkpoint,
    format_evaluation,
)
from tunesmith.evaluation.memory import PeakMemory
from tunesmith.evaluation.speed import forward_latency, percentile


class SlowFirstCall(nn.Module):
    """Sleeps on its first call (a cold start); counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(0.3 if self.calls == 1 else 0.002)
        return input_ids.float().sum()


def batches(n: int, size: int = 4) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": torch.ones(size, 8, dtype=torch.long)} for _ in range(n)]


def inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"]}


def test_latency_probe_positive_ordered_and_warmup_excluded() -> None:
    model = SlowFirstCall()
    timed = forward_latency({"m": model}, batches(6), inputs, warmup=2)["m"]
    assert model.calls == 2 + 6
    assert timed.batches == 6 and timed.batch_size == 4
    assert 0 < timed.p50_ms <= timed.p95_ms < 100  # the 300 ms cold start was a warm-up pass
    assert timed.examples_per_s > 0

    cold = SlowFirstCall()
    untimed = forward_latency({"m": cold}, batches(6), inputs, warmup=0)["m"]
    assert untimed.p95_ms > 100  # without warm-up the cold start lands in the timings


def test_percentile_interpolates() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 95) == 5
    assert percentile([1, 2, 3, 4, 5], 100) == 5


def _forward_peak(model: nn.Module, batch_size: int) -> float:
    with torch.no_grad(), PeakMemory() as peak:
        model(torch.randn(batch_size, 128, 256))
    assert peak.reading is not None
    return peak.reading.added_mb


def test_peak_memory_grows_with_the_batch() -> None:
    layer = nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True).eval()
    small = _forward_peak(layer, 2)
    large = _forward_peak(layer, 256)
    assert large > small + 50  # 256 x 128 x 1024 floats of FFN activations alone: 128 MiB


def test_peak_memory_sampling_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "reset_peak_rss", lambda: False)
    with PeakMemory(interval_s=0.001) as peak:
        block = torch.ones(50_000_000)  # 200 MB, touched
        time.sleep(0.05)
        del block
    assert peak.reading is not None and peak.reading.method == "sampled"
    assert peak.reading.added_mb > 150


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv(tmp_path_factory.mktemp("eval") / "eval.csv", toy_rows(60, seed=5))


def test_full_evaluation_of_a_checkpoint(tiny_runs: dict[str, Path], eval_data: Path) -> None:
    options = EvalOptions(
        batch_size=8, latency_batches=3, strengths=(0.0, 0.5), robustness_samples=40
    )
    report = evaluate_checkpoint(tiny_runs["lora"], str(eval_data), options=options)
    assert report["examples"] == 60 and report["metric"] == "accuracy"
    assert 0 <= report["metrics"]["accuracy"] <= 1 and report["metrics"]["loss"] > 0
    lat, thr = report["latency_bs1"], report["throughput"]
    assert lat["batch_size"] == 1 and thr["batch_size"] == 8
    assert 0 < lat["p50_ms"] <= lat["p95_ms"] and thr["real_tokens_per_s"] > 0
    assert report["peak_memory"]["peak_mb"] > 0
    # An adapter checkpoint is small on disk, the model it loads is not.
    assert 0 < report["size"]["weights_mb"] < report["parameters"]["total"] * 4 / 1e6
    assert report["parameters"]["trained"] < report["parameters"]["total"]
    rob = report["robustness"]
    assert rob["examples"] == 40
    for kind in ("typo", "case", "swap", "delete"):
        zero = rob["kinds"][kind]["0.0"]
        assert zero["metric"] == rob["clean"] and zero["drop"] == 0  # strength 0 == clean
    assert "robustness" in format_evaluation(report)


def test_eval_full_cli_writes_evaluation_json(
    tiny_runs: dict[str, Path], eval_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tiny_runs["full"]
    args = ["eval", str(checkpoint), "--data", str(eval_data), "--full", "--timed-batches", "2"]
    args += ["--strengths", "0.2", "--robustness-samples", "20", "--batch-size", "8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "latency" in out and "throughput" in out and "robustness" in out
    saved = json.loads((checkpoint.parent / EVALUATION_FILE).read_text())
    assert saved["throughput"]["batch_size"] == 8
    assert list(saved["robustness"]["mean_drop"]) == ["0.2"]


def test_eval_full_refuses_unknown_perturbation(
    tiny_runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", str(tiny_runs["full"]), "--split", "validation", "--full"]
    cli_fails(capsys, [*args, "--perturb", "typo,shout"], "unknown perturbation shout")
