"""The heads of sequence classification (``task.problem_type``) as config validation sees them.

One task, three heads: single-label (softmax), multi-label (a sigmoid per
label) and regression (one output per target column). They share the encoder,
the data pipeline and the loop, but not every loss or label key makes sense for
each: a class weight has no class to weigh in a regression, a focal term no
softmax to focus in a multi-label head. These checks name each such key at
config time instead of ignoring it during a run. Torch-free, like every spec.
"""

from __future__ import annotations

from typing import Any

from tunesmith.config.specs import Problem, TaskSpec

#: Metric names per problem type; the first is the headline (``eval.metric``'s default).
METRICS_BY_PROBLEM: dict[str, tuple[str, ...]] = {
    "single_label": ("accuracy", "macro_f1"),
    "multi_label": ("micro_f1", "macro_f1", "subset_accuracy"),
    "regression": ("rmse", "pearson", "spearman", "mse", "mae"),
}
#: Regression metrics where lower is better (errors); correlations go up.
REGRESSION_LOWER = frozenset({"rmse", "mse", "mae"})
#: ``loss.type`` values per head.
_LOSSES = {
    "single_label": ("cross_entropy", "focal"),
    "multi_label": ("cross_entropy",),
    "regression": ("mse", "huber"),
}


def problem_type_problems(task: type[TaskSpec], cfg: Any) -> list[Problem]:
    """``task.problem_type`` must be one the task has a head for; so must a regression loss."""
    kind = cfg.task.problem_type
    if kind not in task.problem_types:
        return [
            Problem(
                "task.problem_type",
                f"task.problem_type: {kind} is not available with task.type {task.name} "
                f"(it has: {', '.join(task.problem_types)})",
            )
        ]
    if "regression" not in task.problem_types and cfg.loss.type in _LOSSES["regression"]:
        return [
            Problem(
                "loss.type",
                f"loss.type: {cfg.loss.type} is a regression loss (task.type "
                "sequence_classification with task.problem_type regression)",
            )
        ]
    return []


def head_problems(cfg: Any) -> list[Problem]:
    """Keys of ``loss``, ``data``, ``task`` and ``distill`` the chosen head cannot use."""
    kind, loss, data = cfg.task.problem_type, cfg.loss, cfg.data
    problems = []
    if kind != "multi_label" and data.label_delimiter is not None:
        problems.append(_only("data.label_delimiter", "multi_label", kind))
    if kind != "regression" and data.label_columns is not None:
        problems.append(_only("data.label_columns", "regression", kind))
    if loss.type not in _LOSSES[kind]:
        problems.append(
            Problem(
                "loss.type",
                f"loss.type: {loss.type} does not fit task.problem_type {kind}; "
                f"use {' or '.join(_LOSSES[kind])}",
            )
        )
    if kind == "single_label":
        return problems
    why = (
        "its labels are independent yes/no targets"
        if kind == "multi_label"
        else "its targets are numbers, not classes"
    )
    unused = (
        ("loss.class_weights", loss.class_weights is not None),
        ("loss.focal_alpha", loss.focal_alpha is not None),
        ("task.label_smoothing", cfg.task.label_smoothing > 0),
        ("data.limit_per_class", data.limit_per_class is not None),
        ("data.labels", kind == "regression" and data.labels is not None),
        ("distill.teacher", cfg.distill.teacher is not None),
    )
    problems += [
        Problem(key, f"{key}: not available with task.problem_type {kind} ({why})")
        for key, on in unused
        if on
    ]
    return problems


def _only(key: str, wanted: str, kind: str) -> Problem:
    return Problem(key, f"{key}: only read with task.problem_type {wanted} (it is {kind})")
