"""``train.trackers``: a real MLflow server on loopback receives what metrics.jsonl holds.

The server is ``mlflow server`` started by the test (SQLite store, proxied
artifacts in a temporary folder); runs log to it through ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import tiny_config, toy_rows, write_csv
from serve_fixtures import free_port
from tunesmith.api import train
from tunesmith.config.root import Config
from tunesmith.errors import ConfigError, TrainingInterrupted
from tunesmith.training.monitor import read_metrics

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{folder}/mlflow.db"]
    command += ["--artifacts-destination", str(folder / "artifacts")]
    log = open(folder / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((folder / "server.log").read_text()[-2000:])
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def run_config(model: Path, tmp: Path, name: str, **train_keys: Any) -> Config:
    data = write_csv(tmp / "train.csv", toy_rows(96))
    cfg = tiny_config(model, data, tmp / name)
    cfg["data"]["test_fraction"] = 0.2
    cfg["train"].update(
        {"epochs": 2, "log_steps": 1, "eval_steps": 3, "trackers": ["mlflow"]} | train_keys
    )
    cfg["train"]["experiment"] = f"tests-{name}"
    return Config.from_dict(cfg)


def stop_at_seven(record: dict[str, Any]) -> None:
    """A sink that interrupts a run when step 7's training record is written (the trackers,
    after it in the list of sinks, have seen step 6; the checkpoint is step 4's)."""
    if record.get("split") == "train" and record.get("step") == 7:
        raise TrainingInterrupted("stopped by the test", signum=2)


def history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def jsonl_history(run_dir: Path, split: str, key: str) -> list[tuple[int, float]]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    return sorted((r["step"], r[key]) for r in rows if r["split"] == split and key in r)


def test_mlflow_gets_every_metric_the_params_tags_and_artifacts(
    mlflow_url, tiny_bert, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    cfg = run_config(tiny_bert, tmp_path, "plain")
    result = train(cfg, progress=False)
    run_id = json.loads((result.output_dir / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(mlflow_url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "plain"
    assert run.data.params["optim.lr"] == str(cfg.optim.lr)
    assert run.data.params["train.trackers"] == "['mlflow']"
    assert run.data.tags["tunesmith.method"] == cfg.method.name
    for split, key in (("train", "loss"), ("validation", "accuracy"), ("test", "accuracy")):
        got = history(client, run_id, f"{split}/{key}")
        want = jsonl_history(result.output_dir, split, key)
        assert [s for s, _ in got] == [s for s, _ in want] and want
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    logged = {f.path for f in client.list_artifacts(run_id)}
    assert {"config.yaml", "metrics.jsonl", "summary.json"} <= logged


def test_a_resumed_run_continues_the_same_mlflow_run_without_repeating_steps(
    mlflow_url, tiny_bert, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    cfg = run_config(tiny_bert, tmp_path, "resumed", save_steps=4, eval_steps=100)

    # The trackers see step 6 (after the checkpoint at step 4) before the stop.
    with pytest.raises(TrainingInterrupted):
        train(cfg, progress=False, sinks=[stop_at_seven])
    out = Path(cfg.train.output_dir)
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(mlflow_url)
    assert client.get_run(run_id).info.status == "KILLED"
    assert max(s for s, _ in history(client, run_id, "train/loss")) == 6
    result = train(cfg, progress=False, resume="latest")
    assert json.loads((out / "trackers.json").read_text())["mlflow"] == run_id
    got = history(client, run_id, "train/loss")
    want = jsonl_history(result.output_dir, "train", "loss")
    assert [s for s, _ in got] == [s for s, _ in want]  # no step twice
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert client.get_run(run_id).info.status == "FINISHED"


def test_an_unreachable_tracker_stops_the_run_before_training(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = run_config(tiny_bert, tmp_path, "unreachable")
    with pytest.raises(ConfigError, match=r"train\.trackers: mlflow could not start"):
        train(cfg, progress=False)
    assert not (Path(cfg.train.output_dir) / "metrics.jsonl").exists()


def test_a_tracker_failing_mid_run_never_costs_the_run(tiny_bert, tmp_path, monkeypatch, caplog):
    from tunesmith.training import mlflow_sink

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    calls = {"n": 0}
    real = mlflow_sink.MLflowSink.__call__

    def flaky(self: Any, record: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise ConnectionError("the tracking server went away")
        real(self, record)

    monkeypatch.setattr(mlflow_sink.MLflowSink, "__call__", flaky)
    result = train(run_config(tiny_bert, tmp_path, "flaky"), progress=False)
    assert result.test_metrics and calls["n"] == 3  # dropped after the failure
    assert "mlflow failed at step" in caplog.text


def test_deprecated_tensorboard_key_beside_trackers_is_an_error(tiny_bert, tmp_path):
    alias = run_config(tiny_bert, tmp_path, "alias", trackers=[], tensorboard=True)
    assert alias.train.active_trackers == ["tensorboard"]  # the old key still works
    with pytest.raises(ConfigError, match=r"train\.trackers: set together with the deprecated"):
        run_config(tiny_bert, tmp_path, "both", tensorboard=True)
    with pytest.raises(ConfigError, match="listed twice"):
        run_config(tiny_bert, tmp_path, "twice", trackers=["mlflow", "mlflow"])


def test_a_comparisons_runs_nest_under_one_mlflow_run(mlflow_url, tiny_bert, tmp_path, monkeypatch):
    import yaml
    from mlflow.tracking import MlflowClient

    from tunesmith.evaluation.evaluator import EvalOptions
    from tunesmith.studies.compare.runner import run_compare

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    cfg = run_config(tiny_bert, tmp_path, "compare-base").model_dump(mode="json")
    cfg["train"]["epochs"] = 1
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    options = EvalOptions(latency_batches=1, warmup=0, kinds=(), batch_size=8)
    out = tmp_path / "cmp"
    results = run_compare(path, ["lora"], out, options=options)  # one worker: ~10 s
    assert [r["status"] for r in results] == ["ok"]
    parent = json.loads((out / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(mlflow_url)
    assert client.get_run(parent).info.status == "FINISHED"
    experiment = client.get_experiment_by_name(cfg["train"]["experiment"]).experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")
    assert [r.data.tags["tunesmith.method"] for r in children] == ["lora"]
    assert all(r.data.metrics.get("train/loss") is not None for r in children)


# -- Weights & Biases (offline) -------------------------------------------------------------
def wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """Every history row of the run's offline W&B files, in the order written.

    wandb 0.31 no longer ships a Python reader for ``.wandb`` files (its Go core
    writes them); they are LevelDB-log framed records of wandb's own protobuf
    ``Record``, which is what this reads (32 KiB blocks, 7-byte record headers).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, buf = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
            if left < 7 or (length == 0 and kind == 0):
                pos += left
                continue
            buf += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = pb.Record()
                record.ParseFromString(buf)
                buf = b""
                if record.WhichOneof("record_type") == "history":
                    items = record.history.item
                    row = {
                        ("/".join(i.nested_key) or i.key): json.loads(i.value_json) for i in items
                    }
                    rows.append(row)
    return rows


def test_a_wandb_offline_run_holds_the_same_history(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = run_config(tiny_bert, tmp_path, "wb", trackers=["wandb"])
    result = train(cfg, progress=False)
    rows = wandb_history(result.output_dir)
    for split, key in (("train", "loss"), ("validation", "accuracy"), ("test", "accuracy")):
        got = sorted((r["_step"], r[f"{split}/{key}"]) for r in rows if f"{split}/{key}" in r)
        want = jsonl_history(result.output_dir, split, key)
        assert [s for s, _ in got] == [s for s, _ in want] and want
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    ids = json.loads((result.output_dir / "trackers.json").read_text())
    assert ids["wandb"] in next((result.output_dir / "wandb").glob("offline-run-*")).name


def test_a_resumed_run_continues_the_same_wandb_run_without_repeating_steps(
    tiny_bert, tmp_path, monkeypatch
):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = run_config(tiny_bert, tmp_path, "wb-resumed", trackers=["wandb"], save_steps=4)

    with pytest.raises(TrainingInterrupted):
        train(cfg, progress=False, sinks=[stop_at_seven])
    out = Path(cfg.train.output_dir)
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]
    result = train(cfg, progress=False, resume="latest")
    files = sorted((out / "wandb").glob("offline-run-*"))
    assert len(files) == 2 and all(run_id in f.name for f in files)  # one run, twice
    rows = [r for r in wandb_history(out) if "train/loss" in r]
    assert [r["_step"] for r in rows] == [s for s, _ in jsonl_history(out, "train", "loss")]
    assert result.test_metrics
