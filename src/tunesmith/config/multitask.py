"""The ``multitask`` section: the tasks sharing one encoder, their weights and sampling.

A multi-task config sets ``task.type: multitask`` and names its tasks here,
each with its own head type, loss weight and ``data`` section::

    task:
      type: multitask
    data:                  # optional: defaults shared by every task's data
      max_length: 128
    multitask:
      sampling: temperature
      temperature: 2.0
      tasks:
        sentiment: {type: sequence_classification, data: {train: rt.csv}}
        ner: {type: token_classification, weight: 2.0, data: {train: wnut.conll}}

The top-level ``data`` section then holds no files (each task names its own)
and its other keys are defaults for every task's ``data``; a task's own key
wins. The rest of the ``task`` section (``label_all_subtokens``, ...) is shared
by the tasks as written.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from tunesmith.config.base import Section, check_choice
from tunesmith.config.data import DataConfig
from tunesmith.config.specs import all_task_specs

#: ``task.type`` of multi-task training.
MULTITASK = "multitask"
#: Data keys naming files: never shared, each task names its own.
FILE_KEYS = ("train", "validation", "test")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Names that would collide with the averaged metric or the loss.
_RESERVED = ("average", "loss")


class TaskDataConfig(DataConfig):
    """A task's ``data`` section: as ``data``, with its training file required."""

    train: str = Field(..., min_length=1, description="Training file (csv, jsonl, parquet).")


class SubTaskConfig(Section):
    """One task of a multi-task run: its head, its loss weight and its data."""

    type: str = Field(..., description="Task type of this head.")
    weight: float = Field(
        1.0, gt=0, description="Factor of this task's mean loss in the weighted sum."
    )
    data: TaskDataConfig = Field(..., description="This task's data (keys as in data).")

    @field_validator("type")
    @classmethod
    def _has_head(cls, value: str) -> str:
        heads = [s.name for s in all_task_specs() if s.multitask_head]
        return check_choice("multi-task head type", value, heads)


class MultitaskConfig(Section):
    """Multi-task training (task.type multitask): one shared encoder, a head per task."""

    tasks: dict[str, SubTaskConfig] = Field(
        default_factory=dict,
        description="multitask: name -> {type, weight, data}: each task's head type "
        "(sequence_classification | token_classification), loss weight (default 1) and data "
        "section (keys as in data; top-level data keys are shared defaults).",
    )
    sampling: Literal["proportional", "uniform", "temperature"] = Field(
        "proportional",
        description="multitask: how often each task gets a batch: proportional to its "
        "training examples, uniform, or temperature (n^(1/T)).",
    )
    temperature: float = Field(
        2.0, gt=0, description="multitask: T of temperature sampling (1: proportional)."
    )
    task_adapters: bool = Field(
        False,
        description="multitask: shared-private training: each task also trains its own "
        "bottleneck adapter after every encoder block (the method adapts the shared encoder).",
    )
    adapter_reduction: int = Field(
        16, ge=1, description="multitask: bottleneck of a task adapter: hidden size / this."
    )
    adapter_activation: Literal["relu", "gelu", "tanh", "silu"] = Field(
        "relu", description="multitask: activation of the task adapters."
    )

    @field_validator("tasks")
    @classmethod
    def _names(cls, value: dict[str, SubTaskConfig]) -> dict[str, SubTaskConfig]:
        for name in value:
            if not _NAME.fullmatch(name) or name in _RESERVED:
                raise ValueError(
                    f"task name {name!r} must be a Python-style identifier (letters, digits, "
                    f"_) other than {' or '.join(_RESERVED)}: it names the head and prefixes "
                    "the task's metrics (<name>/accuracy)"
                )
        return value


def share_data_defaults(values: Any) -> Any:
    """Copy the top-level ``data`` keys (but files) into every task's ``data`` as defaults.

    Runs on the raw config mapping before validation, so a task's data is
    validated, saved and shown whole; a key the task sets itself wins.
    """
    if not isinstance(values, dict):
        return values
    multitask, shared = values.get("multitask"), values.get("data")
    tasks = multitask.get("tasks") if isinstance(multitask, dict) else None
    if not isinstance(tasks, dict) or not isinstance(shared, dict):
        return values
    defaults = {k: v for k, v in shared.items() if k not in FILE_KEYS}
    merged = {
        name: {**sub, "data": {**defaults, **sub["data"]}}
        if isinstance(sub, dict) and isinstance(sub.get("data"), dict)
        else sub
        for name, sub in tasks.items()
    }
    return {**values, "multitask": {**multitask, "tasks": merged}}


def sub_config(cfg: Any, name: str) -> Any:
    """The single-task config of task ``name``: the run's ``Config``, with its type and data."""
    sub = cfg.multitask.tasks[name]
    return cfg.model_copy(
        update={
            "task": cfg.task.model_copy(update={"type": sub.type}),
            "data": sub.data,
            "multitask": MultitaskConfig(),
        }
    )
