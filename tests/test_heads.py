"""Multi-label and regression heads of sequence classification (``task.problem_type``).

Tiny random BERT runs on toy data: which sentiment kinds a sentence holds
(multi-label: pos, neg, both or none) and how many positive and negative words
it has (regression, two targets). The runs check what must never break: the
thresholds come from validation alone, the regression metrics are scipy's, and
``best/`` is the checkpoint with the lowest RMSE.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import FILLER, NEGATIVE, POSITIVE, tiny_config, write_csv
from tunesmith.api import evaluate, predict, train
from tunesmith.config.root import Config
from tunesmith.data.loading import load_records
from tunesmith.data.targets import label_set_reader, number_reader
from tunesmith.errors import ConfigError, DataError
from tunesmith.models.folders import read_manifest
from tunesmith.tasks.head_metrics import multi_label_metrics, regression_metrics, tune_thresholds
from tunesmith.training.monitor import read_metrics


def sentiment_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Sentences with 0-2 positive and 0-2 negative words among filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pos, neg = rng.randint(0, 2), rng.randint(0, 2)
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
        for word in [rng.choice(POSITIVE) for _ in range(pos)] + [
            rng.choice(NEGATIVE) for _ in range(neg)
        ]:
            words.insert(rng.randint(0, len(words)), word)
        kinds = [k for k, c in (("pos", pos), ("neg", neg)) if c]
        rows.append(
            {"text": " ".join(words), "kinds": "|".join(kinds), "pos": str(pos), "neg": str(neg)}
        )
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("heads-data")
    test_rows = sentiment_rows(30, seed=3)
    for row in test_rows:  # test labels the opposite of the text: tuning on them would show
        row["kinds"] = "|".join(k for k in ("pos", "neg") if k not in row["kinds"].split("|"))
    return {
        "train": write_csv(tmp / "train.csv", sentiment_rows(96, seed=1)),
        "validation": write_csv(tmp / "validation.csv", sentiment_rows(30, seed=2)),
        "test": write_csv(tmp / "test.csv", test_rows),
    }


def head_config(tiny_bert: Path, files: dict[str, Path], out: Path, **sections: dict) -> Config:
    cfg = tiny_config(tiny_bert, files["train"], out, **sections)
    cfg["data"].update(validation=str(files["validation"]), test=str(files["test"]))
    cfg["train"].update(precision="fp32", batch_size=16)
    return Config.from_dict(cfg)


def test_regression_metrics_equal_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    refs = np.array([[0.5, 1.0], [1.5, 1.0], [2.0, 3.0], [3.5, 2.0], [4.0, 2.0], [1.0, 0.0]])
    preds = np.array([[0.7, 1.2], [1.1, 0.8], [2.2, 2.0], [3.0, 2.0], [4.5, 2.1], [1.1, 0.3]])
    got = regression_metrics(preds, refs, ["a", "b"])
    for j, name in enumerate("ab"):
        assert got[f"pearson/{name}"] == pytest.approx(stats.pearsonr(preds[:, j], refs[:, j])[0])
        assert got[f"spearman/{name}"] == pytest.approx(
            stats.spearmanr(preds[:, j], refs[:, j])[0]  # ties in both columns of b
        )
        rmse = np.sqrt(np.mean((preds[:, j] - refs[:, j]) ** 2))
        assert got[f"rmse/{name}"] == pytest.approx(rmse)
    assert got["rmse"] == pytest.approx(np.sqrt(np.mean((preds - refs) ** 2)))
    assert got["mae"] == pytest.approx(np.mean(np.abs(preds - refs)))
    assert got["pearson"] == pytest.approx(
        np.mean([stats.pearsonr(preds[:, j], refs[:, j])[0] for j in range(2)])
    )


def test_thresholds_maximise_each_labels_f1() -> None:
    probs = np.array([[0.9, 0.2], [0.6, 0.3], [0.4, 0.35], [0.1, 0.1]])
    refs = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    cuts = tune_thresholds(probs, refs)
    assert 0.4 < cuts[0] <= 0.6 and 0.2 < cuts[1] <= 0.3
    assert multi_label_metrics(probs, refs, ["x", "y"], cuts)["micro_f1"] == 1.0
    assert tune_thresholds(probs, np.zeros_like(refs)) == [0.5, 0.5]  # no positives: 0.5


def test_multi_label_thresholds_come_from_validation_only(tiny_bert, files, tmp_path, one_thread):
    cfg = head_config(
        tiny_bert,
        files,
        tmp_path / "run",
        task={"problem_type": "multi_label"},
        data={"label_column": "kinds", "label_delimiter": "|"},
        optim={"lr": 1e-2},
        train={"max_steps": 48, "eval_steps": 24},
    )
    result = train(cfg, progress=False)
    assert result.best_dir is not None
    manifest = read_manifest(result.best_dir)
    stored = manifest["task_state"]["thresholds"]
    labels = manifest["labels"]
    assert labels == ["neg", "pos"]
    config = json.loads((result.best_dir / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"

    def outputs(split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = predict(result.best_dir, input_path=str(files[split]))
        records = load_records(
            files[split], label_column=None, targets=label_set_reader("kinds", "|")
        )
        probs = np.array([[r["probabilities"][lab] for lab in labels] for r in rows])
        refs = np.array([[lab in rec["targets"] for lab in labels] for rec in records])
        return probs, refs

    val_probs, val_refs = outputs("validation")
    test_probs, test_refs = outputs("test")
    assert stored == tune_thresholds(val_probs, val_refs)
    assert stored != tune_thresholds(test_probs, test_refs), "test data cannot tell"
    # Test metrics use the stored thresholds, at the end of training and on evaluation.
    want = multi_label_metrics(test_probs, test_refs, labels, stored)
    again = evaluate(result.best_dir, data=str(files["test"]))
    for metrics in (result.test_metrics, again):
        assert [metrics[f"threshold/{lab}"] for lab in labels] == stored
        assert metrics["micro_f1"] == pytest.approx(want["micro_f1"], abs=1e-6)
    # predict gives every label's probability and the labels over their thresholds.
    row = predict(result.best_dir, texts=["good awful film"])[0]
    assert set(row["probabilities"]) == {"neg", "pos"}
    assert row["labels"] == [
        lab for lab, t in zip(labels, stored, strict=True) if row["probabilities"][lab] >= t
    ]


def test_regression_keeps_the_checkpoint_with_the_lowest_rmse(
    tiny_bert, files, tmp_path, one_thread
):
    cfg = head_config(
        tiny_bert,
        files,
        tmp_path / "run",
        task={"problem_type": "regression"},
        data={"label_columns": ["pos", "neg"]},
        optim={"lr": 3e-3},
        train={"max_steps": 40, "eval_steps": 5},
    )
    assert cfg.eval.metric == "rmse" and cfg.loss.type == "mse"
    result = train(cfg, progress=False)
    evals = [
        r for r in read_metrics(result.output_dir / "metrics.jsonl") if r["split"] == "validation"
    ]
    rmse = [r["rmse"] for r in evals]
    assert len(set(rmse)) > 2 and np.argmin(rmse) != np.argmax(rmse), "the run cannot tell"
    lowest = evals[int(np.argmin(rmse))]
    assert result.loop.best_step == lowest["step"]
    assert result.validation_metrics["rmse"] == pytest.approx(min(rmse))
    assert {"pearson/pos", "spearman/neg", "rmse/neg"} <= set(result.test_metrics)
    row = predict(result.best_dir, texts=["good fine awful film"])[0]
    assert set(row["values"]) == {"pos", "neg"}


def test_label_sets_from_lists_and_delimited_text(tmp_path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "l": ["y", "x"]}\n{"text": "b", "l": []}\n')
    got = load_records(jsonl, label_column=None, targets=label_set_reader("l", None))
    assert [r["targets"] for r in got] == [["x", "y"], []]
    csv = write_csv(tmp_path / "d.csv", [{"text": "a", "l": "x; y"}, {"text": "b", "l": ""}])
    got = load_records(csv, label_column=None, targets=label_set_reader("l", ";"))
    assert [r["targets"] for r in got] == [["x", "y"], []]


def test_regression_targets_name_the_row_and_key(tmp_path) -> None:
    csv = write_csv(tmp_path / "d.csv", [{"text": "a", "v": "1.5"}, {"text": "b", "v": "high"}])
    with pytest.raises(DataError, match=r"d.csv:3: column 'v' .*data.label_columns"):
        load_records(csv, label_column=None, targets=number_reader(["v"]))
    dropped: list[str] = []
    empty = write_csv(tmp_path / "e.csv", [{"text": "a", "v": "1"}, {"text": "b", "v": ""}])
    got = load_records(empty, label_column=None, targets=number_reader(["v"]), dropped=dropped)
    assert [r["targets"] for r in got] == [[1.0]] and dropped == ["e.csv:3"]


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"task": {"problem_type": "regression"}, "loss": {"type": "focal"}}, "loss.type"),
        (
            {"task": {"problem_type": "regression"}, "loss": {"class_weights": "inverse"}},
            "loss.class_weights",
        ),
        ({"task": {"problem_type": "multi_label", "label_smoothing": 0.1}}, "task.label_smoothing"),
        ({"loss": {"type": "mse"}}, "loss.type"),
        ({"data": {"train": "t", "label_delimiter": "|"}}, "data.label_delimiter"),
        (
            {"task": {"type": "token_classification", "problem_type": "multi_label"}},
            "task.problem_type",
        ),
    ],
)
def test_head_keys_that_do_not_fit_are_config_errors(sections: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Config.from_dict({"model": {"name_or_path": "m"}, "data": {"train": "t"}, **sections})
