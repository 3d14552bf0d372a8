"""What config validation knows of a task or method: its spec, torch-free.

Why: validating a config needs each task's and method's name, settings and
capabilities (may it pack rows? does it have classes?) but none of its torch
code, and ``tunesmith config validate`` should not pay seconds of imports to
say that a key is misspelt. So every task and method has a small spec class,
registered here from torch-free modules (``task_specs``, ``method_specs``);
the implementation (``tasks/*.py``, ``methods/*.py``) inherits from its spec
(``class CausalLM(CausalLMSpec, Task)``), so a capability is a class attribute
of both and every check reads it there, never from a list of names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunesmith.core.registry import Registry


@dataclass(frozen=True)
class Problem:
    """One problem of a config, found by a check that looks across sections.

    Attributes:
        key: The dotted key the problem is about (its line is reported), or the
            key path as a tuple when a key itself holds dots (``search``).
        message: What is wrong and how to fix it.
        missing: True when the key is absent (reported without a line).
    """

    key: str | tuple[str, ...]
    message: str
    missing: bool = False

    @property
    def loc(self) -> tuple[str, ...]:
        """The key path: ``("data", "padding_free")``."""
        return self.key if isinstance(self.key, tuple) else tuple(self.key.split("."))


class Problems(ValueError):
    """Every problem the cross-section checks found, raised once from the validator.

    ``Config.load`` reports each with its line; anyone validating directly
    sees them joined by ``"; "``.
    """

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(p.message for p in self.problems))


class TaskSpec:
    """A task as config validation sees it: name, metrics, capabilities, checks.

    Subclasses set the class attributes and are registered with
    :func:`register_task_spec`; the task implementation inherits from its spec.
    ``cfg`` below is the run's ``Config`` (typed ``Any``: the config root
    imports the specs, so they cannot import it back).
    """

    #: Registry name, as written in ``task.type``.
    name: str = ""
    #: Metric names this task reports (``eval.metric`` must be one of them or ``loss``).
    metric_names: tuple[str, ...] = ()
    #: Metrics where lower is better, also as the family of per-label keys (``rmse`` for
    #: ``rmse/<target>``); ``loss`` always is, and every other metric is higher-is-better.
    #: Declared, never guessed from a metric's name (see ``higher_is_better``).
    lower_better_metrics: frozenset[str] = frozenset()
    #: The ``task.problem_type`` values this task has a head for.
    problem_types: tuple[str, ...] = ("single_label",)
    #: ``peft.TaskType`` name for adapter methods (None: peft's plain ``PeftModel``).
    peft_task_type: str | None = "SEQ_CLS"
    #: False when examples of different kinds may not share a batch (multi-task: a
    #: batch goes through one head), so the training set is batched only by
    #: ``train_sampler``; the frozen-prefix feature cache, which batches every
    #: training example by length, is then not used, and DDP is told that a
    #: step may leave parameters (the other heads) without a gradient.
    mixed_batches: bool = True
    #: False when a batch is not one row per feature (a preference pair is two
    #: sequences), so the frozen-prefix feature cache, which stores per-row states,
    #: cannot serve it.
    feature_cacheable: bool = True
    #: True when ``build_model`` adds a newly initialised head (classifiers): adapter
    #: methods then train it and save it with the adapter. False when the model's own
    #: pretrained output layer is the head (seq2seq, causal LM: often tied to the
    #: input embeddings), which adapter methods leave frozen like the rest of the base.
    new_head: bool = True
    #: True when every target is one of a fixed set of classes (a text's label, a
    #: token's tag): the ``loss`` section (focal loss, class weights) and
    #: distillation from a teacher's class logits apply.
    has_classes: bool = False
    #: True when a record's words can be edited (EDA: synonyms, insertions, swaps,
    #: deletions) and its labels still hold: ``data.augment.multiplier``.
    word_augment: bool = False
    #: True when each row has one label of its own (not one per word): K-shot limits
    #: (``data.limit_per_class``) count rows per label, and back-translation may
    #: rewrite a text's words without tags to realign.
    row_labels: bool = False
    #: True when the model takes ``position_ids`` and builds its causal mask from
    #: them, so a packed row of several examples equals the padded batch
    #: (``data.padding_free``); encoders pool or tag per row.
    packable: bool = False
    #: True when the task reads chats and raw text in the layouts of ``data.format``
    #: (``data/formats``); other tasks read their own columns.
    chat_data: bool = False
    #: True when the task is made of other tasks (``multitask.tasks``), each with
    #: its own labels and head.
    sub_tasks: bool = False
    #: True when the task can be one task of a multi-task run (it has a head for
    #: the shared encoder: ``tasks/multitask_model.py``).
    multitask_head: bool = False
    #: True when the model is one encoder pass with one ``logits`` output, which
    #: ``export --format onnx`` traces into a graph (generation loops are not).
    onnx_export: bool = False
    #: True when the model is a decoder-only language model, which ``export --format
    #: gguf`` writes for llama.cpp and Ollama (GGUF holds no classifier heads or encoders).
    gguf_export: bool = False
    #: True when training batches are made during training from the model's own
    #: samples (RL rollouts, ``Task.rollout``), not read from the data set.
    online: bool = False
    #: False when validation has no loss to report (RL: the model writes its own
    #: answers; validation reports their rewards instead).
    validation_loss: bool = True

    @classmethod
    def default_metric(cls, cfg: Any) -> str:
        """``eval.metric`` when the config leaves it out: the task's headline metric."""
        return cls.metric_names[0]

    @classmethod
    def default_loss(cls, cfg: Any) -> str:
        """``loss.type`` when the config leaves it out."""
        return "cross_entropy"

    @classmethod
    def higher_is_better(cls, metric: str, cfg: Any) -> bool:
        """Whether a larger ``metric`` is better: what early stopping, ``best/`` and studies follow.

        A per-label key (``f1/<label>``, ``rmse/<target>``) goes the way of its
        family, the part before the first slash; ``loss`` and the task's
        ``lower_better_metrics`` go down, everything else up.
        """
        family = metric.split("/", 1)[0]
        return family != "loss" and family not in cls.lower_better_metrics

    @classmethod
    def check_config(cls, cfg: Any) -> list[Problem]:
        """Settings of other sections this task cannot honour (config validation).

        Returns:
            Every problem found, each naming the key and the fix; empty when fine.
        """
        return []


class MethodSpec:
    """A method as config validation sees it: name, accepted keys, capabilities.

    Subclasses set the class attributes and are registered with
    :func:`register_method_spec`; the method implementation inherits from its spec.
    """

    #: Registry name, as written in ``method.name``.
    name: str = ""
    #: The ``method.*`` keys (besides ``name``) this method reads; others are config errors.
    keys: frozenset[str] = frozenset()
    #: True when checkpoints hold only adapter + head weights (loading needs the base).
    saves_adapter: bool = False
    #: True when the adapter is peft's, which can be switched off to give the base model
    #: back (a preference run's reference then costs no second copy of the model).
    peft_adapter: bool = False
    #: False when the method changes what frozen blocks compute (virtual tokens), so
    #: their output cannot be cached (``train.feature_cache``).
    prefix_cacheable: bool = True
    #: False when the method adds inputs per row (virtual tokens), which a packed row
    #: of several examples cannot have (``data.padding_free``).
    packable: bool = True
    #: False when the method needs peft's single-task model classes (virtual
    #: tokens), so it cannot adapt the shared encoder of a multi-task run.
    multitask_encoder: bool = True


#: Task specs by ``task.type``; importing the listed modules registers the built-in ones.
TASK_SPECS: Registry[type[TaskSpec]] = Registry("task.type", ["tunesmith.config.task_specs"])
#: Method specs by ``method.name``; importing the listed modules registers the built-in ones.
METHOD_SPECS: Registry[type[MethodSpec]] = Registry(
    "method.name", ["tunesmith.config.method_specs"]
)
#: Class decorator adding a task spec to the registry under ``cls.name``.
register_task_spec = TASK_SPECS.register
#: Class decorator adding a method spec to the registry under ``cls.name``.
register_method_spec = METHOD_SPECS.register


def all_task_specs() -> list[type[TaskSpec]]:
    """Every registered task spec, by name (filter on a capability: ``if s.packable``)."""
    return [TASK_SPECS.get(name) for name in TASK_SPECS.names()]


def all_method_specs() -> list[type[MethodSpec]]:
    """Every registered method spec, by name (filter on a capability: ``if s.packable``)."""
    return [METHOD_SPECS.get(name) for name in METHOD_SPECS.names()]
