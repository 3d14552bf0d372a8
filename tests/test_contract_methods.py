"""The contract every registered method keeps, whatever it adapts.

Parametrised over ``METHODS.names()`` read at collection time, so a method
added later is covered without touching this file. Each method trains a few
steps through ``api.train`` on a tiny random model (sequence classification,
or the first other task whose config validation accepts the method), then:

* only what it hands the optimizer changes: every other parameter, and every
  frozen pretrained weight, is bit-identical to before training, and at least
  one trained parameter moved;
* ``final/`` reloads to the predictions and validation metrics of the model it
  was saved from, and a second reload gives the same again;
* ``export --merge`` either folds the method into a plain model that predicts
  what the adapter checkpoint predicts, or refuses it, saying why. Which of
  the two is the code's own answer (``Method.merged``), not a list here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers import (
    PEFT_TEST_MARKS,
    TaskData,
    assert_outputs_close,
    contract_config,
    task_data,
    train_spying,
)
from tunesmith.api import TrainResult, evaluate, load_checkpoint, predict
from tunesmith.config.root import Config
from tunesmith.deploy.export import export
from tunesmith.deploy.plain import plain_model
from tunesmith.errors import ConfigError
from tunesmith.methods.base import METHODS
from tunesmith.models.folders import read_manifest
from tunesmith.runs.predict import predict_records
from tunesmith.tasks.base import TASKS

pytestmark = PEFT_TEST_MARKS

#: Settings a method cannot run without. Only those: a method missing here runs on
#: its defaults (every method registered today does).
REQUIRED_SETTINGS: dict[str, dict[str, Any]] = {}
#: The task each method is tried on first.
FIRST_TASK = "sequence_classification"


@dataclass
class MethodRun:
    """A finished contract run plus the model the Trainer trained, as it started."""

    task: str
    data: TaskData
    result: TrainResult
    #: The very object the Trainer updated (what final/ was saved from).
    model: nn.Module
    #: Every parameter's value when training started.
    initial: dict[str, torch.Tensor]
    #: Parameters that required gradients when training started.
    trainable: set[str]
    #: Parameters in the method's optimizer groups.
    grouped: set[str]


def accepted_config(method: str, folder: Path) -> tuple[str, TaskData, Config]:
    """A run of ``method`` on ``FIRST_TASK``, or on the first task whose validation accepts it."""
    settings = {"name": method, **REQUIRED_SETTINGS.get(method, {})}
    refused: dict[str, str] = {}
    for task in [FIRST_TASK, *(t for t in TASKS.names() if t != FIRST_TASK)]:
        data = task_data(task, folder / task)
        try:
            cfg = Config.from_dict(contract_config(data, folder / "run", method=settings))
        except ConfigError as err:  # the code's own refusal of this method for this task
            refused[task] = str(err)
            continue
        return task, data, cfg
    pytest.fail(f"method {method}: no registered task accepts it: {refused}")


@pytest.fixture(scope="module")
def method_run(tmp_path_factory: pytest.TempPathFactory):
    """``method_run(name)``: the method's contract run, trained once per module."""
    cache: dict[str, MethodRun] = {}

    def spy(model: nn.Module, method: Any) -> dict[str, Any]:
        return {
            "model": model,
            "initial": {n: p.detach().clone() for n, p in model.named_parameters()},
            "trainable": {n for n, p in model.named_parameters() if p.requires_grad},
            "grouped": {n for g in method.param_groups(model) for n, _ in g.params},
        }

    def get(method: str) -> MethodRun:
        if method not in cache:
            folder = tmp_path_factory.mktemp(f"contract-{method}")
            task, data, cfg = accepted_config(method, folder)
            result, seen = train_spying(cfg, spy)
            assert result.loop.steps == cfg.train.max_steps
            cache[method] = MethodRun(
                task=task,
                data=data,
                result=result,
                model=seen["model"].eval(),
                initial=seen["initial"],
                trainable=seen["trainable"],
                grouped=seen["grouped"],
            )
        return cache[method]

    return get


def holders(key: str, names: set[str]) -> list[str]:
    """Parameters holding the base folder's weight ``key``: the same name under a
    wrapper's prefix (``bert.``, peft's ``base_model.model.``), peft's ``base_layer`` aside."""
    return [
        n
        for n in names
        if (plain := n.replace(".base_layer.", ".")) == key or plain.endswith(f".{key}")
    ]


# -- (a) only what the method trains changes --------------------------------------------------
@pytest.mark.parametrize("method", METHODS.names())
def test_only_the_methods_parameters_change(method, method_run, record_property):
    run = method_run(method)
    record_property("task", run.task)  # FIRST_TASK unless its validation refused the method
    assert run.grouped, "the method trains nothing"
    assert run.grouped == run.trainable, "the optimizer gets exactly what requires gradients"
    now = {n: p.detach() for n, p in run.model.named_parameters()}
    assert set(now) == set(run.initial)
    changed = {n for n in now if not torch.equal(now[n], run.initial[n])}
    assert changed, "no parameter moved in training"
    assert changed <= run.grouped, f"changed outside the method's groups: {changed - run.grouped}"
    frozen = set(now) - run.trainable
    base = load_file(Path(run.data.config["model"]["name_or_path"]) / "model.safetensors")
    checked = 0  # (a task's model may leave base weights out: no pooler for token tags)
    for key, value in base.items():
        for name in set(holders(key, set(now))) & frozen:
            assert torch.equal(now[name], value), f"frozen {name} differs from the base model"
            checked += 1
    assert checked or not frozen, "no frozen parameter found among the base model's weights"


# -- (b) what is saved reloads to what was trained ------------------------------------------
@pytest.mark.parametrize("method", METHODS.names())
def test_final_reloads_to_the_trained_model(method, method_run):
    run = method_run(method)
    final = run.result.final_dir
    _cfg, task, _model, tokenizer, labels = load_checkpoint(final)
    records = task.text_records(run.data.texts)
    in_memory = predict_records(run.model, task, tokenizer, labels, records)
    reloaded = predict(final, run.data.texts)
    assert_outputs_close(reloaded, in_memory, "final/ vs the trained model")
    assert predict(final, run.data.texts) == reloaded, "a second reload predicts the same"
    # final/ records the validation metrics the trained model had in memory.
    live = read_manifest(final)["validation"]
    assert live and all(math.isfinite(v) for v in live.values() if isinstance(v, float))
    assert_outputs_close(evaluate(final, split="validation"), live, "final/ reloaded")


# -- (c) merging: the same model as one plain folder, or a refusal that says why ---------
def mergeable(method: str, checkpoint: Path) -> bool:
    """The code's answer: ``Method.merged`` gives a model (None: cannot be merged)."""
    return METHODS.get(method).merged(load_checkpoint(checkpoint)[2]) is not None


@pytest.mark.parametrize("method", METHODS.names())
def test_merge_equals_unmerged_or_is_refused_with_a_reason(method, method_run):
    run = method_run(method)
    final, merged = run.result.final_dir, run.result.output_dir / "merged"
    if not mergeable(method, final):
        refusals = []
        for attempt in (
            lambda: export(final, merged, merge=True),
            lambda: plain_model(method, load_checkpoint(final)[2], "export --quantize int8"),
        ):
            with pytest.raises(ConfigError, match=f"method '{method}' cannot be merged") as info:
                attempt()
            refusals.append(str(info.value))
        assert not merged.exists()
        for message in refusals:
            assert "()" not in message, f"the refusal names no reason: {message}"
        return
    export(final, merged, merge=True)
    assert not list(merged.rglob("adapter_*")), "a merged export holds no adapter"
    assert not read_manifest(merged)["adapter"]
    adapter = METHODS.get(method).saves_adapter
    assert load_checkpoint(merged)[0].method.name == ("full" if adapter else method)
    want = predict(final, run.data.texts)
    assert_outputs_close(predict(merged, run.data.texts), want, "merged vs unmerged")
    assert_outputs_close(
        evaluate(merged, split="validation"),
        evaluate(final, split="validation"),
        "merged vs unmerged validation",
    )


def test_required_settings_name_registered_methods():
    assert set(REQUIRED_SETTINGS) <= set(METHODS.names()), "settings of an unregistered method"
