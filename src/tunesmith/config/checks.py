"""Checks across sections: settings the run's task or method cannot honour.

Run as part of config validation (``Config``'s validator), so a key that a run
would silently ignore (focal loss on a seq2seq run, a layer-dropped student
saved as an adapter, packed rows with virtual tokens) fails before anything is
loaded. Each check reads the capability flags of the task and method specs
(``config/specs.py``) and returns every problem it finds, so a file's problems
are reported together. They take the sections they read, not the whole
``Config``: the config root imports them.
"""

from __future__ import annotations

from tunesmith.config.data import DataConfig
from tunesmith.config.distill import DistillConfig
from tunesmith.config.losses import LossConfig
from tunesmith.config.regularize import ForgettingConfig, RegularizeConfig
from tunesmith.config.specs import MethodSpec, Problem, TaskSpec, all_task_specs
from tunesmith.config.train import TrainConfig


def _task_names(has: str) -> list[str]:
    """Names of the task specs whose ``has`` capability is set (for messages)."""
    return [s.name for s in all_task_specs() if getattr(s, has)]


def objective_problems(
    task: type[TaskSpec],
    method: type[MethodSpec],
    loss: LossConfig,
    regularize: RegularizeConfig,
    forgetting: ForgettingConfig,
    distill: DistillConfig,
) -> list[Problem]:
    """Settings of ``loss``, ``regularize``, ``forgetting`` and ``distill`` the run cannot use."""
    problems = []
    kind = task.name
    if not task.has_classes and not task.sub_tasks:
        class_tasks = _task_names("has_classes")
        if loss.customised:
            key = "loss.type" if loss.type != "cross_entropy" else "loss.class_weights"
            problems.append(
                Problem(
                    key,
                    f"{key}: only for {' and '.join(class_tasks)} (task.type is {kind}); "
                    "task.label_smoothing applies to every task",
                )
            )
        if distill.teacher is not None:
            problems.append(
                Problem(
                    "distill.teacher",
                    "distill.teacher: distillation needs class logits "
                    f"({', '.join(class_tasks)}); task.type is {kind}",
                )
            )
    if not task.chat_data and not task.sub_tasks:
        readers = " or ".join(_task_names("chat_data"))
        for key, on in (
            ("reference_text", forgetting.reference_text is not None),
            ("probe_prompts", bool(forgetting.probe_prompts)),
        ):
            if on:
                problems.append(
                    Problem(
                        f"forgetting.{key}",
                        f"forgetting.{key}: for generative runs (task.type {readers}); "
                        "a classifier's forgetting is measured on reference_data",
                    )
                )
    if task.sub_tasks:
        used = (
            ("loss.class_weights", loss.class_weights is not None),
            ("loss.focal_alpha", loss.focal_alpha is not None),
            ("regularize.hidden_dropout", regularize.hidden_dropout is not None),
            ("regularize.attention_dropout", regularize.attention_dropout is not None),
            ("forgetting.reference_data", forgetting.active),
            ("distill.teacher", distill.teacher is not None),
        )
        problems += [
            Problem(
                key,
                f"{key}: not available with task.type multitask (each task has its own "
                "labels and head); train the tasks separately to use it",
            )
            for key, on in used
            if on
        ]
    if distill.student_layers is not None and method.saves_adapter:
        problems.append(
            Problem(
                "distill.student_layers",
                f"distill.student_layers: the student is a new, smaller model; method "
                f"'{method.name}' saves only an adapter for model.name_or_path. Use full or "
                "freeze, or set model.name_or_path to a saved student",
            )
        )
    return problems


def augment_problems(task: type[TaskSpec], data: DataConfig, train: TrainConfig) -> list[Problem]:
    """Augmentation (and K-shot limits) the run's task or training loop cannot use."""
    problems = []
    augment, kind = data.augment, task.name
    row_tasks = _task_names("row_labels")
    if augment.dynamic_masking and train.feature_cache in ("memory", "disk"):
        problems.append(
            Problem(
                "train.feature_cache",
                f"train.feature_cache: {train.feature_cache} cannot be used with "
                "data.augment.dynamic_masking: the masked inputs change every epoch, cached "
                "hidden states would not; set feature_cache: auto or off",
            )
        )
    if data.limit_per_class is not None and not task.row_labels:
        problems.append(
            Problem(
                "data.limit_per_class",
                f"data.limit_per_class: K-shot needs one label per row ({', '.join(row_tasks)}); "
                f"task.type is {kind}",
            )
        )
    if augment.enabled and not task.word_augment:
        problems.append(
            Problem(
                "data.augment.multiplier",
                "data.augment.multiplier: augmentation edits words of "
                f"{' or '.join(_task_names('word_augment'))} data; task.type {kind} is not "
                "supported (use dynamic_masking)",
            )
        )
    if augment.enabled and augment.back_translation and not task.row_labels:
        problems.append(
            Problem(
                "data.augment.back_translation",
                "data.augment.back_translation: a translation cannot keep word tags aligned; "
                f"only for {', '.join(row_tasks)}",
            )
        )
    if augment.dynamic_masking and task.sub_tasks:
        problems.append(
            Problem(
                "data.augment.dynamic_masking",
                "data.augment.dynamic_masking: not supported with task.type multitask",
            )
        )
    return problems


def padding_free_problems(
    task: type[TaskSpec], method: type[MethodSpec], data: DataConfig, distill: DistillConfig
) -> list[Problem]:
    """Where packed rows (``data.padding_free``, ``data.packing: documents``) change results."""
    if not data.packed_rows:
        return []
    key = "data.padding_free" if data.padding_free else "data.packing"
    fix = "set padding_free: false" if data.padding_free else "use packing concat or none"
    problems = []
    if not task.packable:
        problems.append(
            Problem(
                key,
                f"{key}: only for task.type "
                f"{' or '.join(_task_names('packable'))} (decoders whose attention mask "
                "follows position_ids); encoder tasks pool or tag per row, and "
                "data.group_by_length already leaves them ~2% padding",
            )
        )
    if not method.packable:
        problems.append(
            Problem(
                key,
                f"{key}: method {method.name} adds virtual tokens per row, which "
                f"a packed row of several examples cannot have; {fix}",
            )
        )
    if distill.teacher:
        problems.append(
            Problem(key, f"{key}: distillation matches teacher outputs per example row; {fix}")
        )
    return problems


def data_format_problems(task: type[TaskSpec], data: DataConfig) -> list[Problem]:
    """``data.format``, ``data.roles`` and ``data.packing`` are read by chat-data tasks only."""
    if task.chat_data:
        if data.packing != "none" and data.format not in ("auto", "text"):
            return [
                Problem(
                    "data.packing",
                    f"data.packing: {data.packing} packs raw text (data.format text); chats "
                    f"(data.format {data.format}) are packed per batch by data.padding_free",
                )
            ]
        return []
    readers = " or ".join(_task_names("chat_data"))
    return [
        Problem(f"data.{key}", f"data.{key}: only read by task.type {readers} ({why})")
        for key, why, set_ in (
            ("format", "other tasks read their own columns", data.format != "auto"),
            ("roles", "ShareGPT role names", bool(data.roles)),
            ("packing", "raw-text pre-training", data.packing != "none"),
        )
        if set_
    ]


def tracker_problems(train: TrainConfig) -> list[Problem]:
    """``train.tensorboard`` (deprecated) beside ``train.trackers``; a tracker named twice."""
    problems = []
    if train.tensorboard and train.trackers:
        problems.append(
            Problem(
                "train.trackers",
                "train.trackers: set together with the deprecated train.tensorboard; list "
                "tensorboard in train.trackers and drop train.tensorboard",
            )
        )
    twice = sorted({t for t in train.trackers if train.trackers.count(t) > 1})
    if twice:
        problems.append(
            Problem("train.trackers", f"train.trackers: {', '.join(twice)} listed twice")
        )
    return problems
