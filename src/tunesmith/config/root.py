"""Typed run configuration: one YAML file, validated before anything expensive.

Why: a fine-tuning run can take hours, so a typo in a key or an out-of-range value
must fail up front, before a model is loaded, with a line per problem that names the
file, the line, the key and the fix (``config/load.py``: every problem of a file at
once). Every section forbids unknown keys, so a typo never falls back silently to a
default. Settings that only some tasks or methods honour are checked against their
capabilities (``config/checks.py``, ``config/specs.py``), which need no torch.
``Config.save`` writes the fully resolved config (every default filled in, paths
resolved) next to a run so the run can be reproduced exactly.

Paths: ``model.name_or_path`` and ``data.train`` / ``data.validation`` / ``data.test``
written in the file as relative paths are resolved against the config file's folder
when they exist there, so a config can sit next to its data. Otherwise they are left
as written (relative to the working directory, or a hub-like id). Paths given by
command-line overrides, and ``train.output_dir``, always stay relative to the current
working directory, like any other command-line path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tunesmith.config.base import (  # noqa: F401 (field_docs re-exported)
    Section,
    field_docs,
    section_model,
    suggest,
)
from tunesmith.config.checks import (
    augment_problems,
    data_format_problems,
    objective_problems,
    padding_free_problems,
    tracker_problems,
)
from tunesmith.config.data import DataConfig
from tunesmith.config.distill import DistillConfig
from tunesmith.config.heads import problem_type_problems
from tunesmith.config.load import (  # noqa: F401 (apply_overrides re-exported)
    Lines,
    apply_overrides,
    describe,
    not_a_mapping,
    prepare,
    read_file,
)
from tunesmith.config.losses import LossConfig
from tunesmith.config.methods import MethodConfig
from tunesmith.config.multitask import FILE_KEYS, MultitaskConfig, share_data_defaults
from tunesmith.config.preference import PreferenceConfig, preference_problems
from tunesmith.config.regularize import ForgettingConfig, RegularizeConfig
from tunesmith.config.rl import RLConfig, rl_problems
from tunesmith.config.specs import METHOD_SPECS, TASK_SPECS, Problem, Problems, TaskSpec
from tunesmith.config.tasks import GenerateConfig, TaskConfig
from tunesmith.config.train import TrainConfig
from tunesmith.config.tune import Distribution, TuneConfig
from tunesmith.errors import ConfigError


class ModelConfig(Section):
    """The pretrained model to fine-tune."""

    name_or_path: str = Field(..., min_length=1, description="Local transformers model folder.")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped in the model folder (it runs as you)."
    )
    allow_unsafe_weights: bool = Field(
        False, description="Allow pickled .bin/.pt weights; off: unpickling can run code."
    )


class OptimConfig(Section):
    """AdamW and the learning-rate schedule."""

    lr: float = Field(5e-5, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW beta1, beta2 in [0, 1).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warmup."
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    warmup_steps: int | None = Field(
        None, ge=0, description="Warmup steps; overrides warmup_ratio."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient-norm clip; null: none.")
    clip_mode: Literal["global", "per_group"] = Field(
        "global",
        description="Clip the norm of all gradients together, or of each layer group "
        "(also under FSDP; DeepSpeed clips the global norm only and refuses per_group).",
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"betas must each be in [0, 1) (got {list(value)})")
        return value


class EvalConfig(Section):
    """Which metric selects the best checkpoint and drives early stopping."""

    metric: str = Field(
        "accuracy",
        min_length=1,
        description="Metric that picks the best model; when left out, the task's headline "
        "metric (accuracy; micro_f1 for multi_label, rmse for regression; entity_f1 for "
        "token_classification; bleu for seq2seq, or loss "
        "when generate.in_eval is false; for multitask, average: the mean of the tasks' "
        "headline metrics, or one task's as <task>/<metric>).",
    )
    greater_is_better: bool | None = Field(
        None,
        description="Direction of the metric; null: as the task declares it (loss, "
        "perplexity, rmse, mse, mae: lower is better; every other metric: higher).",
    )


class Config(Section):
    """A complete run: every section, validated together."""

    model: ModelConfig = Field(..., description="The pretrained model to fine-tune.")
    task: TaskConfig = Field(default_factory=TaskConfig, description="What the model learns.")
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="Where the examples are and how to read them (multitask: shared defaults).",
    )
    method: MethodConfig = Field(default_factory=MethodConfig, description="How weights change.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Model selection metric.")
    generate: GenerateConfig = Field(
        default_factory=GenerateConfig, description="Text generation (seq2seq, causal_lm)."
    )
    multitask: MultitaskConfig = Field(
        default_factory=MultitaskConfig,
        description="Tasks sharing one encoder (task.type multitask).",
    )
    loss: LossConfig = Field(default_factory=LossConfig, description="Classification losses.")
    preference: PreferenceConfig = Field(
        default_factory=PreferenceConfig,
        description="Preference optimisation losses (task.type preference).",
    )
    rl: RLConfig = Field(
        default_factory=RLConfig,
        description="Online reinforcement fine-tuning: GRPO, RLOO (task.type rl).",
    )
    regularize: RegularizeConfig = Field(
        default_factory=RegularizeConfig, description="Dropout overrides and L2-SP."
    )
    forgetting: ForgettingConfig = Field(
        default_factory=ForgettingConfig, description="EWC, replay and the forgetting report."
    )
    distill: DistillConfig = Field(
        default_factory=DistillConfig, description="Knowledge distillation from a teacher."
    )
    search: dict[str, Distribution] = Field(
        default_factory=dict,
        description="tunesmith tune: dotted config key -> {loguniform|uniform|int|categorical: "
        "...}; ignored by train.",
    )
    tune: TuneConfig = Field(
        default_factory=TuneConfig, description="tunesmith tune: pruning and study storage."
    )

    @model_validator(mode="before")
    @classmethod
    def _share_data(cls, values: Any) -> Any:
        return share_data_defaults(values)

    @model_validator(mode="after")
    def _across_sections(self) -> Config:
        # Every check runs and every problem is raised at once, so a file's problems
        # are reported together (each with its line: ``_describe``).
        task = TASK_SPECS.get(self.task.type)
        method = METHOD_SPECS.get(self.method.name)
        if "metric" not in self.eval.model_fields_set:
            # A default that names another task's metric would fail the run at start.
            self.eval.metric = task.default_metric(self)
        if "type" not in self.loss.model_fields_set:
            self.loss.type = task.default_loss(self)  # type: ignore[assignment]
        problems = [
            *problem_type_problems(task, self),
            *self._layout_problems(task),
            *(p for p in map(search_key_problem, self.search) if p is not None),
            *task.check_config(self),
            *augment_problems(task, self.data, self.train),
            *tracker_problems(self.train),
            *padding_free_problems(task, method, self.data, self.distill),
            *data_format_problems(task, self.data),
            *preference_problems(self.task.type, self.preference, self.task, self.data.format),
            *rl_problems(self.task.type, self.rl, self),
            *objective_problems(
                task, method, self.loss, self.regularize, self.forgetting, self.distill
            ),
        ]
        if problems:
            raise Problems(problems)
        return self

    def higher_is_better(self) -> bool:
        """Direction of ``eval.metric``: ``eval.greater_is_better``, else the task's declaration.

        Early stopping, ``best/``, evaluation reports and studies all ask here,
        so a metric's direction is decided once, by the task that reports it.
        """
        if self.eval.greater_is_better is not None:
            return self.eval.greater_is_better
        return TASK_SPECS.get(self.task.type).higher_is_better(self.eval.metric, self)

    def _layout_problems(self, task: type[TaskSpec]) -> list[Problem]:
        """Where the data files are named: ``data`` (one task) or each task's (multi-task)."""
        # data.train is optional in DataConfig only because multi-task runs name a
        # file per task; every other run needs it.
        if not task.sub_tasks:
            problems = []
            if self.multitask.tasks:
                problems.append(
                    Problem(
                        "multitask.tasks",
                        "multitask.tasks: only read with task.type multitask "
                        f"(task.type is {self.task.type})",
                    )
                )
            if self.data.train is None:
                problems.append(
                    Problem("data.train", "missing required key 'data.train'", missing=True)
                )
            return problems
        if not self.multitask.tasks:
            return [
                Problem(
                    "task.type",
                    "task.type multitask needs multitask.tasks: a section per task "
                    "(<name>: {type: ..., data: {train: ...}})",
                )
            ]
        return [
            Problem(
                f"data.{key}",
                f"data.{key}: with task.type multitask each task names its own files "
                f"(multitask.tasks.<name>.data.{key}); the data section holds shared "
                "defaults only",
            )
            for key in FILE_KEYS
            if getattr(self.data, key) is not None
        ]

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = ()) -> Config:
        """Read, override and validate a YAML config file.

        Args:
            path: The YAML file.
            overrides: ``section.key=value`` strings applied after reading the file;
                values are YAML (``3e-5``, ``true``, ``null``, ``[a, b]``).

        Raises:
            ConfigError: Every problem of the file, a line each naming the file, line
                (or override), key and fix.
        """
        path = Path(path)
        data, lines = read_file(path)
        return cls._build(data, str(path), overrides, lines)

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], source: str = "<dict>", overrides: Sequence[str] = ()
    ) -> Config:
        """Validate an in-memory config (paths are used as given).

        Raises:
            ConfigError: Every problem, a line each naming ``source`` and the key.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: {not_a_mapping(d)}")
        return cls._build(dict(d), source, overrides, {})

    @classmethod
    def _build(
        cls, data: dict[str, Any], source: str, overrides: Sequence[str], lines: Lines
    ) -> Config:
        merged, origins = prepare(data, overrides)
        for name in cls.model_fields:  # "optim:" with every key commented out means defaults
            if name in merged and merged[name] is None:
                merged[name] = {}
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(describe(exc, cls, source, lines, origins)) from None

    def to_yaml(self) -> str:
        """Return the fully resolved config (all defaults filled) as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> Path:
        """Write ``to_yaml()`` to ``path`` (folders created); ``Config.load`` reads it back."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path


#: Keys a search may not change: where the trials write, and the search itself.
_UNSEARCHABLE = ("search", "tune", "train.output_dir", "train.overwrite")


def search_key_problem(key: str) -> Problem | None:
    """A ``search`` key that is not a setting of the config (nearest key suggested)."""
    parts = key.split(".")
    loc = ("search", key)
    if key.startswith(_UNSEARCHABLE):
        return Problem(loc, f"search: '{key}' cannot be searched")
    parent = section_model(Config, parts[:-1]) if len(parts) > 1 else None
    if parent is None:
        return Problem(
            loc, f"search: '{key}' is not a config key (give section.key, e.g. optim.lr)"
        )
    fields = parent.model_fields
    leaf = parts[-1]
    if leaf not in fields:
        prefix = ".".join(parts[:-1]) + "."
        return Problem(loc, f"search: unknown key '{key}'{suggest(leaf, fields, prefix)}")
    annotation = fields[leaf].annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return Problem(loc, f"search: '{key}' is a section; search one of its keys")
    return None
