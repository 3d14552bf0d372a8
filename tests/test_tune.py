"""`tunesmith tune`: search space checks, pruning of bad trials, resuming a stored study."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import tiny_config, toy_rows, write_csv
from helpers import cli_fails
from tunesmith.cli import main
from tunesmith.config.root import Config
from tunesmith.errors import ConfigError
from tunesmith.studies.tune.space import as_overrides, decode, suggest

pytestmark = pytest.mark.usefixtures("one_thread")


def tune_config(tiny_bert: Path, tmp: Path, search: dict, **tune: object) -> Path:
    data = write_csv(tmp / "train.csv", toy_rows(120))
    cfg = tiny_config(tiny_bert, data, tmp / "run")
    cfg["train"].update(epochs=4, eval_steps=6, log_steps=6)
    cfg["data"]["validation_fraction"] = 0.25
    cfg["search"] = search
    cfg["tune"] = {"startup_trials": 1, **tune}
    path = tmp / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def load(path: Path) -> optuna.Study:
    folder = Path(Config.load(path).train.output_dir + "-tune")
    return optuna.load_study(study_name="tunesmith", storage=f"sqlite:///{folder / 'study.db'}")


def test_space_samples_every_kind_and_round_trips_lists(tiny_bert: Path, tmp_path: Path) -> None:
    search = {
        "optim.lr": {"loguniform": [1e-5, 1e-3]},
        "optim.warmup_ratio": {"uniform": [0.0, 0.2]},
        "method.train_layers": {"int": [1, 2]},
        "method.target_modules": {"categorical": [["query"], ["query", "value"]]},
    }
    cfg = Config.load(tune_config(tiny_bert, tmp_path, search))
    trial = optuna.trial.FixedTrial(
        {
            "optim.lr": 3e-4,
            "optim.warmup_ratio": 0.1,
            "method.train_layers": 2,
            "method.target_modules": '["query", "value"]',
        }
    )
    values = suggest(trial, cfg.search)
    assert values["method.target_modules"] == ["query", "value"]
    assert decode(trial.params, cfg.search) == values
    assert 'method.target_modules=["query", "value"]' in as_overrides(values)


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"optim.lrr": {"loguniform": [1e-5, 1e-3]}}, "did you mean 'optim.lr'"),
        ({"train.output_dir": {"categorical": ["a", "b"]}}, "cannot be searched"),
        ({"optim": {"uniform": [0, 1]}}, "not a config key"),
        ({"optim.lr": {"loguniform": [0, 1e-3]}}, "low must be > 0"),
        ({"optim.lr": {"uniform": [1e-3, 1e-5]}}, "low must be below high"),
    ],
)
def test_invalid_search_space_is_rejected_before_any_trial(
    tiny_bert: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    search: dict,
    message: str,
) -> None:
    path = tune_config(tiny_bert, tmp_path, search)
    with pytest.raises(ConfigError, match=message):
        Config.load(path)
    cli_fails(capsys, ["tune", str(path), "--trials", "2"], message)
    assert not (tmp_path / "run-tune").exists()  # no study, no trial


def test_huge_learning_rates_are_pruned_and_the_best_lr_is_sane(
    tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tune_config(tiny_bert, tmp_path, {"optim.lr": {"loguniform": [1e-3, 1e3]}})
    assert main(["tune", str(path), "--trials", "8", "--keep-best"]) == 0
    out = capsys.readouterr().out
    study = load(path)
    states = [t.state for t in study.trials]
    assert len(states) == 8
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(t.params["optim.lr"] > 1 for t in pruned), [
        (t.params, t.state) for t in study.trials
    ]
    assert study.best_params["optim.lr"] < 0.1 and study.best_value >= 0.8
    # Pruned trials stopped early: fewer evaluations than the 4 of a full trial.
    full = max(t.user_attrs["evaluations"] for t in study.trials)
    assert all(t.user_attrs["evaluations"] < full for t in pruned)

    folder = tmp_path / "run-tune"
    best = Config.load(folder / "best.yaml")
    assert best.optim.lr == pytest.approx(study.best_params["optim.lr"])
    assert best.search == {} and best.train.output_dir == str(tmp_path / "run")
    assert "best: trial" in out and (folder / "trials.md").read_text().count("\n| ") == 9
    for png in ("history.png", "intermediate.png"):
        assert (folder / "plots" / png).stat().st_size > 2000
    assert "plots/history.png" in (folder / "report.html").read_text()
    # Trials keep their metrics only; --keep-best keeps one best/ checkpoint.
    kept = sorted(p.parent.name for p in folder.glob("trials/*/best"))
    assert kept == [f"trial-{study.best_trial.number:04d}"]
    assert not list(folder.glob("trials/*/final"))
    for t in study.trials:
        if t.user_attrs.get("evaluations"):
            assert (folder / "trials" / f"trial-{t.number:04d}" / "metrics.jsonl").is_file()


def test_invalid_combinations_are_pruned_with_their_error(
    tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    search = {  # BitFit-style bias training belongs to freeze, not to lora
        "method.name": {"categorical": ["freeze", "lora"]},
        "method.train_biases": {"categorical": [True]},
    }
    path = tune_config(tiny_bert, tmp_path, search, pruner="none")
    assert main(["tune", str(path), "--trials", "6"]) == 0
    study = load(path)
    for t in study.trials:
        if t.params["method.name"] == "lora":
            assert t.state == optuna.trial.TrialState.PRUNED
            assert "train_biases: does not apply to method 'lora'" in t.user_attrs["error"]
        else:
            assert t.state == optuna.trial.TrialState.COMPLETE
    assert {t.params["method.name"] for t in study.trials} == {"freeze", "lora"}


def test_interrupted_study_continues_without_repeating_trials(
    tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Long enough trials, never pruned, that the interruption lands inside the second one
    # even on a fast machine.
    space = {"optim.lr": {"loguniform": [1e-3, 1e-2]}}
    path = tune_config(tiny_bert, tmp_path, space, pruner="none")
    changes = ["train.epochs=48", "train.num_threads=1"]
    cmd = [sys.executable, "-m", "tunesmith", "tune", str(path), "--trials", "5", *changes]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    db = tmp_path / "run-tune" / "study.db"
    # Watched through the file system: opening the study while the process creates it
    # would race it to create the database's tables.
    second = tmp_path / "run-tune" / "trials" / "trial-0001" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not second.is_file():
        time.sleep(0.3)
    assert db.is_file() and second.is_file()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    first = load(path).trials
    assert [t.state.name for t in first] == ["COMPLETE", "FAIL"]

    assert main(["tune", str(path), "--trials", "3", "train.epochs=4"]) == 0
    again = load(path).trials
    assert [t.number for t in again] == [0, 1, 2, 3]
    assert again[0].datetime_complete == first[0].datetime_complete  # not re-run
    assert [t.state.name for t in again[2:]] != ["FAIL", "FAIL"]
    finished = [t for t in again if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3
    lrs = [t.params["optim.lr"] for t in again]
    assert len(set(lrs)) == len(lrs)  # no configuration drawn twice


@pytest.mark.parametrize("pruner", ["median", "asha"])
def test_warmup_evals_protects_the_first_evaluations(pruner: str) -> None:
    from tunesmith.config.tune import TuneConfig
    from tunesmith.studies.tune.study import make_pruner

    settings = TuneConfig(pruner=pruner, startup_trials=1, warmup_evals=1)
    study = optuna.create_study(direction="maximize", pruner=make_pruner(settings))
    for _ in range(3):  # good trials to compare with
        good = study.ask()
        for step in (1, 2, 3):  # as the pruning sink does: report, then ask
            good.report(0.9, step)
            assert not good.should_prune()
        study.tell(good, 0.9)
    bad = study.ask()
    bad.report(0.1, 1)
    assert not bad.should_prune()  # evaluation 1 is inside the warm-up
    bad.report(0.1, 2)
    assert bad.should_prune()
