"""The command line: bad input gives one clear line and exit code 2; commands work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config, toy_rows, write_csv
from helpers import cli_fails as _fails_cleanly
from helpers import write_config as _config_file
from tunesmith.cli import main


@pytest.fixture
def base(tiny_bert: Path, tmp_path: Path) -> dict:
    data = write_csv(tmp_path / "train.csv", toy_rows(40))
    return tiny_config(tiny_bert, data, tmp_path / "run", train={"epochs": 1})


def test_missing_data_file(capsys, tmp_path, base):
    base["data"]["train"] = str(tmp_path / "nope.csv")
    _fails_cleanly(capsys, ["train", str(_config_file(tmp_path, base))], "nope.csv", "not found")


def test_missing_column(capsys, tmp_path, base):
    base["data"]["text_column"] = "review"
    _fails_cleanly(
        capsys, ["train", str(_config_file(tmp_path, base))], "train.csv", "'review'", "text"
    )


def test_empty_data_set(capsys, tmp_path, base):
    (tmp_path / "empty.csv").write_text("text,label\n")
    base["data"]["train"] = str(tmp_path / "empty.csv")
    _fails_cleanly(capsys, ["train", str(_config_file(tmp_path, base))], "empty.csv", "no rows")


def test_validation_label_never_seen_in_training(capsys, tmp_path, base):
    dev = write_csv(
        tmp_path / "dev.csv",
        [{"text": "a film", "label": "pos"}, {"text": "meh", "label": "neutral"}],
    )
    base["data"]["validation"] = str(dev)
    _fails_cleanly(
        capsys, ["train", str(_config_file(tmp_path, base))], "dev.csv:3", "'neutral'", "validation"
    )


def test_undecodable_text(capsys, tmp_path, base):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("text,label\ngood film,pos\ncaf\xe9 film,neg\n".encode("latin-1"))
    base["data"]["train"] = str(bad)
    _fails_cleanly(capsys, ["train", str(_config_file(tmp_path, base))], "latin1.csv:3", "UTF-8")


def test_unknown_config_key_names_line_and_suggestion(capsys, tmp_path, base):
    path = _config_file(tmp_path, base)
    path.write_text(path.read_text() + "optim2: {}\n")
    _fails_cleanly(capsys, ["config", "validate", str(path)], "cfg.yaml", "optim2", "optim")
    _fails_cleanly(capsys, ["train", str(path)], "optim2")


def test_bad_override(capsys, tmp_path, base):
    path = _config_file(tmp_path, base)
    _fails_cleanly(capsys, ["train", str(path), "optim.lr=-1"], "optim.lr")
    _fails_cleanly(capsys, ["train", str(path), "train.batch_sise=4"], "batch_size")


def test_model_path_that_is_not_a_model(capsys, tmp_path, base):
    (tmp_path / "notamodel").mkdir()
    base["model"]["name_or_path"] = str(tmp_path / "notamodel")
    _fails_cleanly(capsys, ["train", str(_config_file(tmp_path, base))], "notamodel", "config.json")


def test_pickle_only_weights_refused(capsys, tmp_path, base, tiny_bert):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_bert, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    base["model"]["name_or_path"] = str(folder)
    _fails_cleanly(capsys, ["train", str(_config_file(tmp_path, base))], "pickle", "safetensors")


def test_debug_shows_traceback(tmp_path, base):
    from tunesmith.errors import DataError

    base["data"]["train"] = str(tmp_path / "nope.csv")
    with pytest.raises(DataError):
        main(["--debug", "train", str(_config_file(tmp_path, base))])


def test_config_show_prints_resolved_config(capsys, tmp_path, base):
    path = _config_file(tmp_path, base)
    assert main(["config", "show", str(path), "optim.lr=3e-5", "train.epochs=2"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["optim"]["lr"] == 3e-5 and shown["train"]["epochs"] == 2
    assert shown["train"]["grad_accum"] == 1  # defaults are filled in


def test_train_eval_predict_commands(capsys, tmp_path, base):
    path = _config_file(tmp_path, base)
    assert main(["train", str(path), "train.epochs=2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "best validation" in out
    best = Path(base["train"]["output_dir"]) / "best"

    assert main(["eval", str(best), "--split", "validation", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    logged = json.loads((best / "tunesmith.json").read_text())["validation"]
    assert metrics["accuracy"] == logged["accuracy"]

    inputs = write_csv(tmp_path / "in.csv", [{"text": "a superb film"}, {"text": "dull"}])
    target = tmp_path / "preds" / "out.jsonl"
    assert main(["predict", str(best), "--input", str(inputs), "--output", str(target)]) == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["a superb film", "dull"]
    for r in rows:
        assert r["label"] in ("pos", "neg")
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)

    assert main(["predict", str(best), "--text", "lovely"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "lovely"
    _fails_cleanly(capsys, ["predict", str(best)], "--text")
    _fails_cleanly(capsys, ["eval", str(tmp_path)], "not a tunesmith checkpoint")


def test_doctor_reports_machine_and_assets(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for key in ("torch", "transformers", "cpu_capability", "cpu_bf16_native", "asset/minilm"):
        assert key in out


def test_console_script_exit_code(tmp_path):
    """The installed entry point really exits 2 with one line (not a traceback)."""
    exe = Path(sys.executable).with_name("tunesmith")
    proc = subprocess.run(
        [str(exe), "config", "validate", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: config file not found: {tmp_path / 'missing.yaml'}"
    ]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_predict_and_eval_print_no_third_party_noise(tiny_runs, method):
    """What a user sees is tunesmith's output: no deprecation or kernel-loading notices
    of the libraries underneath (torchao's pytree warnings once came with every predict)."""
    exe = Path(sys.executable).with_name("tunesmith")
    best = tiny_runs[method]
    for args in (
        ["predict", str(best), "--text", "a great film"],
        ["eval", str(best), "--split", "validation"],
    ):
        proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        noise = [
            line
            for line in proc.stderr.splitlines()
            if any(w in line for w in ("Warning", "deprecated", "_pytree", "Failed to load"))
        ]
        assert noise == [], args
