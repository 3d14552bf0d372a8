"""`tunesmith compare` (isolated methods, failures, cache), `report` and TensorBoard."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config, toy_rows, write_csv
from helpers import cli_fails
from tunesmith.cli import main
from tunesmith.errors import ConfigError
from tunesmith.evaluation.report import render_report
from tunesmith.studies.compare.presets import method_overrides, parse_methods, parse_sets
from tunesmith.training.monitor import read_metrics


class Collect(HTMLParser):
    """The image sources, links and table cells of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(str(values["src"]))
        if tag == "a":
            self.links.append(str(values["href"]))
        if tag == "td":
            self._in_cell = True
            self.cells.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.cells[-1] += data


def parse(path: Path) -> Collect:
    page = Collect()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_method_presets_and_their_errors() -> None:
    assert "method.train_layers=3" in method_overrides("top3")
    assert parse_methods("full, lora,top2") == ["full", "lora", "top2"]
    with pytest.raises(ConfigError, match="did you mean 'lora'"):
        parse_methods("full,lorra")
    with pytest.raises(ConfigError, match="listed twice"):
        parse_methods("full,full")
    assert parse_sets(["lora:method.r=4"], ["lora"]) == {"lora": ["method.r=4"]}
    with pytest.raises(ConfigError, match="not one of --methods"):
        parse_sets(["dora:method.r=4"], ["lora"])


@pytest.fixture(scope="module")
def compare_config(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("compare")
    data = write_csv(tmp / "train.csv", toy_rows(48))
    reference = write_csv(tmp / "reference.csv", toy_rows(16, seed=9))
    cfg = tiny_config(tiny_bert, data, tmp / "run")
    cfg["train"].update(epochs=1, eval_steps=2)
    cfg["data"]["test_fraction"] = 0.25
    cfg["forgetting"] = {"reference_data": str(reference)}
    path = tmp / "compare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def compare_args(config: Path) -> list[str]:
    return [
        "compare",
        str(config),
        "--methods",
        "full,lora,bottleneck",
        # A deliberate failure: LoRA on module names this model does not have.
        "--set",
        "lora:method.target_modules=[no_such_layer]",
        "--timed-batches",
        "2",
        "--robustness-samples",
        "12",
        "--batch-size",
        "8",
    ]


def test_compare_table_failure_and_cache(
    compare_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = compare_config.parent / "run-compare"
    assert main(compare_args(compare_config)) == 0
    first = capsys.readouterr().out
    assert "lora: FAILED" in first and "no_such_layer" in first

    results = {r["method"]: r for r in json.loads((out / "compare.json").read_text())}
    assert [results[m]["status"] for m in ("full", "lora", "bottleneck")] == ["ok", "failed", "ok"]
    page = parse(out / "compare.html")
    width = 12
    rows = [page.cells[i : i + width] for i in range(0, len(page.cells), width)]
    by_method = {row[0]: row for row in rows}
    for method in ("full", "bottleneck"):
        assert all(cell.strip() for cell in by_method[method]), by_method[method]
        assert by_method[method][-1] != "n/a (no reference)"  # forgetting measured
    assert by_method["lora"][2].startswith("failed: ")
    for link in page.links:  # each method links to its run report
        assert (out / link).is_file()
    assert len(page.links) == 2
    md = (out / "compare.md").read_text()
    assert md.count("\n| ") == 4  # header + three methods

    # Full fine-tuning trains every parameter, the bottleneck adapters a few percent.
    share = {m: results[m]["summary"]["trainable_percent"] for m in ("full", "bottleneck")}
    assert share["full"] == 100 and share["bottleneck"] < 10

    # Second run: finished methods come from the cache, the failed one is tried again.
    stamps = {m: (out / m / "result.json").stat().st_mtime_ns for m in ("full", "bottleneck")}
    assert main(compare_args(compare_config)) == 0
    second = capsys.readouterr().out
    assert second.count("cached result reused") == 2
    assert "lora: FAILED" in second
    assert all((out / m / "result.json").stat().st_mtime_ns == t for m, t in stamps.items())


def test_compare_refuses_bad_method_before_running(
    compare_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_fails(capsys, ["compare", str(compare_config), "--methods", "full,lorra"], "lorra")


def test_report_renders_every_plot(
    tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_csv(tmp_path / "train.csv", toy_rows(64))
    cfg = tiny_config(tiny_bert, data, tmp_path / "run", method={"name": "freeze"})
    cfg["method"]["train_layers"] = 1
    cfg["train"].update(epochs=2, eval_steps=2, log_steps=1, tensorboard=True)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(config), "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out
    page = parse(run / "report.html")
    names = {Path(src).name for src in page.images}
    assert names == {
        f"{n}.png" for n in ("loss", "metrics", "lr", "grad_norms", "throughput", "memory")
    }
    for src in page.images:
        png = run / src
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    text = (run / "report.html").read_text()
    assert "Trainable parameters" in text and "block.1" in text  # the parameter table
    assert "name_or_path" in text  # the resolved config
    assert "accuracy" in page.cells  # the final evaluation

    # TensorBoard got the same scalars as metrics.jsonl.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    board = events.Scalars("train/loss")
    assert [e.step for e in board] == [r["step"] for r in logged]
    assert [e.value for e in board] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    assert "validation/accuracy" in events.Tags()["scalars"]


def test_report_without_a_run_folder_is_an_error(tmp_path: Path) -> None:
    from tunesmith.errors import DataError

    with pytest.raises(DataError, match=r"no metrics\.jsonl"):
        render_report(tmp_path)


def test_a_tracker_without_its_package_fails_before_training(
    monkeypatch: pytest.MonkeyPatch, tiny_bert: Path, tmp_path: Path
) -> None:
    import importlib.util

    from tunesmith.config.root import Config
    from tunesmith.training import trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("tensorboard", "mlflow") else real(name, *a),
    )
    data = write_csv(tmp_path / "train.csv", toy_rows(8))
    for section, message in (
        ({"tensorboard": True}, r"train\.tensorboard: tensorboard needs the tensorboard package"),
        ({"trackers": ["mlflow"]}, r"train\.trackers: mlflow needs the mlflow package"),
    ):
        cfg = Config.from_dict(tiny_config(tiny_bert, data, tmp_path / "run", train=section))
        with pytest.raises(ConfigError, match=message):
            trackers.check_packages(cfg)
