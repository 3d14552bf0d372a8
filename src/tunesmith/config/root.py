"""Typed run configuration: one YAML file, validated before anything expensive.

Why: a fine-tuning run can take hours, so a typo in a key or an out-of-range value
must fail up front, before a model is loaded, with one line that names the file, the
line, the key and the fix. Every section forbids unknown keys, so a typo never falls
back silently to a default. ``Config.save`` writes the fully resolved config (every
default filled in, paths resolved) next to a run so the run can be reproduced exactly.

Paths: ``model.name_or_path`` and ``data.train`` / ``data.validation`` / ``data.test``
written in the file as relative paths are resolved against the config file's folder
when they exist there, so a config can sit next to its data. Otherwise they are left
as written (relative to the working directory, or a hub-like id). Paths given by
command-line overrides, and ``train.output_dir``, always stay relative to the current
working directory, like any other command-line path.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tunesmith.config.base import Section, field_docs, suggest  # noqa: F401 (re-exported)
from tunesmith.config.checks import augment_problems, objective_problems, padding_free_problems
from tunesmith.config.data import DataConfig
from tunesmith.config.distill import DistillConfig
from tunesmith.config.losses import LossConfig
from tunesmith.config.methods import MethodConfig
from tunesmith.config.multitask import FILE_KEYS, MultitaskConfig, share_data_defaults
from tunesmith.config.regularize import ForgettingConfig, RegularizeConfig
from tunesmith.config.specs import METHOD_SPECS, TASK_SPECS, Problem, Problems, TaskSpec
from tunesmith.config.tasks import GenerateConfig, TaskConfig
from tunesmith.config.train import TrainConfig
from tunesmith.config.tune import Distribution, TuneConfig
from tunesmith.core import paths
from tunesmith.errors import ConfigError

# Keys holding input paths that may be written relative to the config file.
_PATH_KEYS = {
    "model": ("name_or_path",),
    "data": ("train", "validation", "test"),
    "forgetting": ("reference_checkpoint", "reference_data"),
    "distill": ("teacher",),
}
# PyYAML (YAML 1.1) reads ``3e-5`` as a string; overrides treat such text as a number.
_NUMBER = re.compile(r"[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?")
_Lines = dict[tuple[str, ...], int]  # key path -> 1-based line in the YAML file
_Origins = dict[tuple[str, ...], str]  # key path -> the override that set it
_OVERRIDE_FORM = "expected the form key.path=value (e.g. optim.lr=3e-5)"


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
        "global", description="Clip the norm of all gradients together, or of each layer group."
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
        "metric (accuracy; entity_f1 for token_classification; bleu for seq2seq, or loss "
        "when generate.in_eval is false; for multitask, average: the mean of the tasks' "
        "headline metrics, or one task's as <task>/<metric>).",
    )
    greater_is_better: bool | None = Field(
        None, description="null: false if the name contains loss/perplexity, else true."
    )

    def higher_is_better(self) -> bool:
        """Return the metric's direction, inferring it from the name when not set."""
        if self.greater_is_better is not None:
            return self.greater_is_better
        name = self.metric.lower()
        return not ("loss" in name or "perplexity" in name)


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
        problems = [
            *self._layout_problems(task),
            *(p for p in map(search_key_problem, self.search) if p is not None),
            *task.check_config(self),
            *augment_problems(task, self.data, self.train),
            *padding_free_problems(task, method, self.data, self.distill),
            *objective_problems(
                task, method, self.loss, self.regularize, self.forgetting, self.distill
            ),
        ]
        if problems:
            raise Problems(problems)
        return self

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
            ConfigError: One line naming the file, line and key of the first problem.
        """
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {source}") from None
        except IsADirectoryError:
            raise ConfigError(f"config path is a folder, not a YAML file: {source}") from None
        except UnicodeDecodeError as exc:
            line = exc.object.count(b"\n", 0, exc.start) + 1
            raise ConfigError(
                f"{source}:{line}: not valid UTF-8 text (byte 0x{exc.object[exc.start]:02x}); "
                "save the config as UTF-8 text"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {source}: {exc.strerror or exc}") from None
        data, lines = _parse_yaml(text, source)
        return cls._build(_resolve_paths(data, path.parent), source, overrides, lines)

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], source: str = "<dict>", overrides: Sequence[str] = ()
    ) -> Config:
        """Validate an in-memory config (paths are used as given).

        Raises:
            ConfigError: One line naming ``source`` and the key of the first problem.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: {_not_a_mapping(d)}")
        return cls._build(dict(d), source, overrides, {})

    @classmethod
    def _build(
        cls, data: dict[str, Any], source: str, overrides: Sequence[str], lines: _Lines
    ) -> Config:
        overrides = [overrides] if isinstance(overrides, str) else list(overrides)
        merged = _resolve_assets(apply_overrides(data, overrides))
        origins = {_parse_override(text)[0]: text for text in overrides}
        for name in cls.model_fields:  # "optim:" with every key commented out means defaults
            if name in merged and merged[name] is None:
                merged[name] = {}
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, source, lines, origins)) from None

    def to_yaml(self) -> str:
        """Return the fully resolved config (all defaults filled) as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> Path:
        """Write ``to_yaml()`` to ``path`` (folders created); ``Config.load`` reads it back."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path


def apply_overrides(d: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``d`` with ``key.path=value`` overrides applied in order.

    Missing sections are created, so an override can set a key the file leaves at its
    default. ``d`` itself is never modified.

    Raises:
        ConfigError: An override is malformed, its value is invalid YAML, or its path
            runs through a value that is not a section.
    """
    result = copy.deepcopy(dict(d))
    for text in [overrides] if isinstance(overrides, str) else overrides:
        path, value = _parse_override(text)
        node = result
        for depth, part in enumerate(path[:-1], start=1):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(path[:depth])
                raise ConfigError(
                    f"override '{_show(text)}': '{_show(where)}' is a value, not a section"
                )
            node = child
        node[path[-1]] = value
    return result


def _parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """Split ``key.path=value`` into the key path and the YAML-parsed value."""
    key, sep, raw = str(text).partition("=")
    path = tuple(part.strip() for part in key.split("."))
    if not sep or not all(path):
        raise ConfigError(f"override '{_show(text)}': {_OVERRIDE_FORM}")
    try:
        value = _construct(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override '{_show(text)}': invalid YAML value: {_yaml_problem(exc)}"
        ) from None
    quoted = raw.strip().startswith(("'", '"'))
    if isinstance(value, str) and not quoted and _NUMBER.fullmatch(value.strip()):
        with contextlib.suppress(ValueError):  # "1_e5": not a float; validation says so
            value = float(value)
    return path, value


def _show(text: Any) -> str:
    """User text inside a message, with line breaks and control characters escaped."""
    text = str(text)
    return text if text.isprintable() else repr(text)[1:-1]


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Return the one-line reason of a YAML error, without PyYAML's source excerpt."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return " ".join(str(problem).split())


def _at_end(problem: str) -> bool:
    """True when PyYAML ran into the end of the file (an unclosed bracket or quote)."""
    return "<stream end>" in problem or "end of stream" in problem


def _not_a_mapping(value: Any) -> str:
    found = "an empty file" if value is None else f"a {type(value).__name__}"
    return f"expected a mapping of sections (model:, data:, ...) at the top level, got {found}"


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` whose failures on bad scalars (``2020-13-45``, ``!!int x``) are YAML errors.

    PyYAML's constructors raise plain ``ValueError``/``TypeError`` for such values;
    turning them into ``ConstructorError`` at the node gives them a line number.
    """

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ArithmeticError, AttributeError, LookupError, TypeError, ValueError) as exc:
            kind = str(node.tag).rsplit(":", 1)[-1]
            shown = repr(node.value)[:60] if isinstance(node, yaml.ScalarNode) else "the value"
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {shown} as a {kind} ({exc})", node.start_mark
            ) from None


def _construct(text: str) -> Any:
    """``yaml.safe_load`` with :class:`_Loader`: every failure is a ``yaml.YAMLError``."""
    try:
        loader = _Loader(text)  # the reader rejects control characters right here
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


def _parse_yaml(text: str, source: str) -> tuple[dict[str, Any], _Lines]:
    """Parse YAML once into data plus a map from key path to 1-based line number."""
    loader = None
    try:
        loader = _Loader(text)  # the reader rejects control characters right here
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if exc.context_mark is not None and _at_end(str(exc.problem)):
            mark = exc.context_mark  # an unclosed bracket or quote: where it opened
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{line}: invalid YAML: {_yaml_problem(exc)}") from None
    except yaml.reader.ReaderError as exc:  # a control character: no mark, only an offset
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(f"{source}:{line}: invalid YAML: {_yaml_problem(exc)}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {_not_a_mapping(data)}")
    lines: _Lines = {}
    _collect_lines(node, (), lines, source, set())
    return data, lines


def _collect_lines(
    node: yaml.Node, path: tuple[str, ...], lines: _Lines, source: str, active: set[int]
) -> None:
    """Record the line of every key and list item; reject duplicate keys (YAML keeps the last)."""
    if id(node) in active:  # a recursive alias; nothing below it is new
        return
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            child = (*path, key_node.value)
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                raise ConfigError(f"{source}:{line}: duplicate key '{_show('.'.join(child))}'")
            seen.add(key_node.value)
            lines[child] = line
            _collect_lines(value_node, child, lines, source, active)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, str(index))] = item.start_mark.line + 1
            _collect_lines(item, (*path, str(index)), lines, source, active)
    active.discard(id(node))


def _path_slots(data: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any], str]]:
    """``(dotted section, its mapping, key)`` of every input path key present in ``data``.

    Besides ``_PATH_KEYS``: each multi-task task's ``data`` files
    (``multitask.tasks.<name>.data.train``), resolved like the top-level ones.
    """
    sections = [(section, data.get(section), keys) for section, keys in _PATH_KEYS.items()]
    multitask = data.get("multitask")
    tasks = multitask.get("tasks") if isinstance(multitask, dict) else None
    for name, sub in tasks.items() if isinstance(tasks, dict) else ():
        if isinstance(sub, dict):
            sections.append((f"multitask.tasks.{name}.data", sub.get("data"), _PATH_KEYS["data"]))
    for section, values, keys in sections:
        for key in keys if isinstance(values, dict) else ():
            yield section, values, key


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Point relative input paths at the config's folder when they exist there."""
    for _section, values, key in _path_slots(data):
        value = values.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            candidate = base / value
            if paths.exists(candidate):
                values[key] = os.path.abspath(candidate)
    return data


def _resolve_assets(data: dict[str, Any]) -> dict[str, Any]:
    """Replace ``asset:NAME`` paths by the offline asset's location on this machine.

    Example configs stay portable: ``model.name_or_path: asset:minilm`` works
    wherever the demo packages are installed.
    """
    from tunesmith.assets.locate import ASSETS, locate

    for section, values, key in _path_slots(data):
        value = values.get(key)
        if isinstance(value, str) and value.startswith("asset:"):
            name = value.removeprefix("asset:")
            if name not in ASSETS:
                raise ConfigError(
                    f"{section}.{key}: unknown asset '{_show(name)}'{suggest(name, ASSETS)} "
                    f"(known: {', '.join(ASSETS)})"
                )
            values[key] = str(locate(ASSETS[name]))
    return data


def _section_model(path: Sequence[str]) -> type[BaseModel] | None:
    """Return the model class validating the mapping at ``path`` (``()`` is ``Config``).

    A ``dict[str, Section]`` field (``multitask.tasks``) consumes the next part as its key.
    """
    model: type[BaseModel] = Config
    parts = iter(path)
    for part in parts:
        field = model.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        if typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
            if next(parts, None) is None:
                return None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


#: Keys a search may not change: where the trials write, and the search itself.
_UNSEARCHABLE = ("search", "tune", "train.output_dir", "train.overwrite")


def search_key_problem(key: str) -> Problem | None:
    """A ``search`` key that is not a setting of the config (nearest key suggested)."""
    parts = key.split(".")
    loc = ("search", key)
    if key.startswith(_UNSEARCHABLE):
        return Problem(loc, f"search: '{key}' cannot be searched")
    parent = _section_model(parts[:-1]) if len(parts) > 1 else None
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


def _describe(exc: ValidationError, source: str, lines: _Lines, origins: _Origins) -> str:
    """Turn pydantic's error list into one line: where, which key, what, how to fix."""
    # Unknown keys first: a misspelt key also makes its intended key look missing.
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    error = errors[0]
    loc = tuple(str(part) for part in error["loc"])
    key = _show(".".join(loc))
    kind = error["type"]
    value = error.get("input")
    if kind == "missing":
        message = f"missing required key '{key}'"
    elif kind == "extra_forbidden":
        model = _section_model(loc[:-1])
        prefix = ".".join(loc[:-1]) + "." if len(loc) > 1 else ""
        hint = suggest(loc[-1], model.model_fields, prefix) if model is not None else ""
        if not hint and model is not None:
            hint = f" (allowed: {', '.join(model.model_fields)})"
        message = f"unknown key '{key}'{hint}"
    else:
        text = error["msg"].removeprefix("Value error, ")
        if kind == "model_type":  # pydantic names the class: "instance of ModelConfig"
            text = "expected a section of settings (indented key: value lines)"
        message = f"{key}: {text}" if key else text
        if kind not in ("value_error", "assertion_error") and not isinstance(value, dict):
            shown = repr(value)
            message += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
        model = _section_model(loc[:-1])
        field = model.model_fields.get(loc[-1]) if model is not None and loc else None
        if kind == "literal_error" and field is not None:
            message += suggest(str(value), [str(a) for a in typing.get_args(field.annotation)])
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return f"{_where(loc, kind, source, lines, origins)}: {message}"


def _where(loc: tuple[str, ...], kind: str, source: str, lines: _Lines, origins: _Origins) -> str:
    """Name the override that set ``loc``, else the file and the nearest known line."""
    latest_first = list(reversed(origins.items()))
    for path, text in latest_first:  # the override set this key or a section holding it
        if loc[: len(path)] == path:
            return f"override '{_show(text)}'"
    if loc in lines and kind != "missing":
        return f"{source}:{lines[loc]}"
    for path, text in latest_first:  # the override wrote below this key (optim.lr.x=1)
        if path[: len(loc)] == loc and loc:
            return f"override '{_show(text)}'"
    if kind != "missing":  # a missing key has no line; its section's line would mislead
        for end in range(len(loc) - 1, 0, -1):
            if loc[:end] in lines:
                return f"{source}:{lines[loc[:end]]}"
    return source
