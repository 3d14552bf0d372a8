"""Which tasks and methods the ``loss``, ``regularize``, ``forgetting`` and ``distill`` keys fit.

Run as part of config validation, so a key that a run would silently ignore
(focal loss on a seq2seq run, a layer-dropped student saved as an adapter)
fails before anything is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunesmith.config.losses import CLASS_TASKS

if TYPE_CHECKING:
    from tunesmith.config.root import Config

_MULTITASK = "multitask"


def check_objective_sections(cfg: Config) -> None:
    """Refuse settings of these sections the run's task or method cannot honour.

    Raises:
        ValueError: Naming the key and the fix (reported as a ConfigError).
    """
    from tunesmith.methods.base import METHODS

    kind = cfg.task.type
    loss, reg, fgt, dst = cfg.loss, cfg.regularize, cfg.forgetting, cfg.distill
    if kind not in CLASS_TASKS and kind != _MULTITASK:
        if loss.customised:
            key = "loss.type" if loss.type != "cross_entropy" else "loss.class_weights"
            raise ValueError(
                f"{key}: only for {' and '.join(CLASS_TASKS)} (task.type is {kind}); "
                "task.label_smoothing applies to every task"
            )
        if dst.teacher is not None:
            raise ValueError(
                f"distill.teacher: distillation needs class logits ({', '.join(CLASS_TASKS)}); "
                f"task.type is {kind}"
            )
    if kind == _MULTITASK:
        used = [
            key
            for key, on in (
                ("loss.class_weights", loss.class_weights is not None),
                ("loss.focal_alpha", loss.focal_alpha is not None),
                ("regularize.hidden_dropout", reg.hidden_dropout is not None),
                ("regularize.attention_dropout", reg.attention_dropout is not None),
                ("forgetting.reference_data", fgt.active),
                ("distill.teacher", dst.teacher is not None),
            )
            if on
        ]
        if used:
            raise ValueError(
                f"{used[0]}: not available with task.type multitask (each task has its own "
                "labels and head); train the tasks separately to use it"
            )
    if dst.student_layers is not None and METHODS.get(cfg.method.name).saves_adapter:
        raise ValueError(
            f"distill.student_layers: the student is a new, smaller model; method "
            f"'{cfg.method.name}' saves only an adapter for model.name_or_path. Use full or "
            "freeze, or set model.name_or_path to a saved student"
        )
