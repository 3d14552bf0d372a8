"""The contract every registered task keeps: it trains, logs, saves, reloads and predicts.

Parametrised over ``TASKS.names()`` read at collection time. Each task gets a
tiny random model and data of its shape from ``helpers.TASK_DATA`` (a task
registered without a builder fails, naming what to add), trains a few steps of
full fine-tuning through ``api.train``, and then:

* the training loss is finite, and ``metrics.jsonl`` has train lines and
  validation lines holding the task's metric (``eval.metric``), all finite;
* the saved checkpoint reloads: ``evaluate`` gives the validation metrics the
  live model recorded, twice over, and ``predict`` gives one row per text,
  the same rows on a second reload.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from helpers import PEFT_TEST_MARKS, TaskData, assert_outputs_close, contract_config, task_data
from tunesmith.api import TrainResult, evaluate, predict, train
from tunesmith.config.root import Config
from tunesmith.models.folders import read_manifest
from tunesmith.tasks.base import TASKS
from tunesmith.training.monitor import read_metrics

pytestmark = PEFT_TEST_MARKS


@pytest.fixture(scope="module")
def task_run(tmp_path_factory: pytest.TempPathFactory):
    """``task_run(name)``: data, config and result of the task's run, trained once per module."""
    cache: dict[str, tuple[TaskData, Config, TrainResult]] = {}

    def get(task: str) -> tuple[TaskData, Config, TrainResult]:
        if task not in cache:
            folder = tmp_path_factory.mktemp(f"contract-{task}")
            data = task_data(task, folder / "data")
            cfg = Config.from_dict(contract_config(data, folder / "run", method={"name": "full"}))
            assert cfg.task.type == task, "the builder's config is for another task"
            cache[task] = data, cfg, train(cfg, progress=False)
        return cache[task]

    return get


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.parametrize("task", TASKS.names())
def test_trains_and_logs_its_metric(task, task_run):
    _data, cfg, result = task_run(task)
    assert result.loop.steps == cfg.train.max_steps
    records = read_metrics(result.output_dir / "metrics.jsonl")
    train_lines = [r for r in records if r["split"] == "train"]
    validation = [r for r in records if r["split"] == "validation"]
    assert train_lines, "no train line in metrics.jsonl"
    assert all(finite(r["loss"]) for r in train_lines), [r["loss"] for r in train_lines]
    assert validation, "no validation line in metrics.jsonl"
    metric = cfg.eval.metric
    assert metric == TASKS.get(task).default_metric(cfg)
    for line in validation:
        assert finite(line.get("loss")) or not TASKS.get(task).validation_loss, line
        assert metric in line and finite(line[metric]), (metric, line)


@pytest.mark.parametrize("task", TASKS.names())
def test_checkpoint_reloads_to_the_same_outputs(task, task_run):
    data, _cfg, result = task_run(task)
    checkpoint = result.best_dir or result.final_dir
    live = read_manifest(checkpoint)["validation"]  # computed by the model before saving
    assert live
    first = evaluate(checkpoint, split="validation")
    assert_outputs_close(first, live, f"{checkpoint.name}/ reloaded vs live")
    assert evaluate(checkpoint, split="validation") == first, "a second reload evaluates the same"
    rows = predict(checkpoint, data.texts)
    assert [r["text"] for r in rows] == data.texts
    assert all(len(r) > 1 for r in rows), f"predictions hold nothing but the text: {rows}"
    assert predict(checkpoint, data.texts) == rows, "a second reload predicts the same"


def test_every_task_has_a_data_builder_and_no_builder_is_stale():
    from helpers import TASK_DATA

    missing = [t for t in TASKS.names() if t not in TASK_DATA]
    assert not missing, f"add a data builder for task {', '.join(missing)} (helpers.TASK_DATA)"
    assert set(TASK_DATA) <= set(TASKS.names()), "a builder for a task no longer registered"
