"""Reading a config file: YAML with line numbers, overrides, paths and where-errors.

Why apart from the schema (``config/root.py``): turning a file into the
mapping the schema validates (lines recorded, overrides applied, relative and
``asset:`` paths resolved) and turning pydantic's errors back into lines of
that file are one job, the sections and their rules another.

Every problem of a file is reported at once (as torchtune's
``config/_validate.py`` collects them): one line each, naming the file and line
(or the override) and the key, with the nearest valid key for a misspelt one.
A single problem is a single line.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tunesmith.assets.locate import ASSETS, locate
from tunesmith.config.base import closest, section_model, suggest
from tunesmith.config.specs import Problems
from tunesmith.core import paths
from tunesmith.errors import ConfigError

# Keys holding input paths that may be written relative to the config file.
_PATH_KEYS = {
    "model": ("name_or_path",),
    "data": ("train", "validation", "test"),
    "forgetting": ("reference_checkpoint", "reference_data", "reference_text"),
    "distill": ("teacher",),
}
# PyYAML (YAML 1.1) reads ``3e-5`` as a string; overrides treat such text as a number.
_NUMBER = re.compile(r"[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?")
Lines = dict[tuple[str, ...], int]  # key path -> 1-based line in the YAML file
Origins = dict[tuple[str, ...], str]  # key path -> the override that set it
_OVERRIDE_FORM = "expected the form key.path=value (e.g. optim.lr=3e-5)"


def read_file(path: Path) -> tuple[dict[str, Any], Lines]:
    """The mapping in YAML file ``path`` (relative input paths resolved) and its key lines.

    Raises:
        ConfigError: The file cannot be read, is not YAML or not a mapping.
    """
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
    return _resolve_paths(data, path.parent), lines


def prepare(data: Mapping[str, Any], overrides: Sequence[str]) -> tuple[dict[str, Any], Origins]:
    """``data`` with the overrides applied and ``asset:`` paths resolved, plus their origins.

    Raises:
        ConfigError: An override is malformed or an asset unknown.
    """
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    merged = _resolve_assets(apply_overrides(data, overrides))
    origins = {_parse_override(text)[0]: text for text in overrides}
    return merged, origins


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


def not_a_mapping(value: Any) -> str:
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


def _parse_yaml(text: str, source: str) -> tuple[dict[str, Any], Lines]:
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
        raise ConfigError(f"{source}: {not_a_mapping(data)}")
    lines: Lines = {}
    _collect_lines(node, (), lines, source, set())
    return data, lines


def _collect_lines(
    node: yaml.Node, path: tuple[str, ...], lines: Lines, source: str, active: set[int]
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


def describe(
    exc: ValidationError, root: type[BaseModel], source: str, lines: Lines, origins: Origins
) -> str:
    """Every problem pydantic found in the config ``root`` validated: where, which key, what.

    One problem is one line (``file:line: message``); several are a line
    saying how many, then one indented line each, in the order of the file.
    """
    errors = _merge_unions(root, exc.errors())
    # A misspelt key also makes its intended key look missing: "did you mean" says it all.
    meant = set()
    for error in errors:
        loc = tuple(str(part) for part in error["loc"])
        model = section_model(root, loc[:-1], optional=True)
        if error["type"] == "extra_forbidden" and model is not None:
            match = closest(loc[-1], model.model_fields)
            if match is not None:
                meant.add((*loc[:-1], match))
    found: list[tuple[tuple[int, int], str, str]] = []  # (order, where, message)
    for error in errors:
        loc = tuple(str(part) for part in error["loc"])
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, Problems):  # the checks across sections: each at its own key
            for problem in cause.problems:
                kind = "missing" if problem.missing else "value_error"
                found.append(
                    (*_where((*loc, *problem.loc), kind, source, lines, origins), problem.message)
                )
            continue
        if error["type"] == "missing" and loc in meant:
            continue
        found.append(
            (*_where(loc, error["type"], source, lines, origins), _message(error, loc, root))
        )
    unique = list(dict.fromkeys(found))
    unique.sort(key=lambda item: item[0])
    if len(unique) == 1:
        _, where, message = unique[0]
        return f"{where}: {message}"
    listed = "\n".join(f"  {where}: {message}" for _, where, message in unique)
    return f"{source}: {len(unique)} problems\n{listed}"


def _message(error: Mapping[str, Any], loc: tuple[str, ...], root: type[BaseModel]) -> str:
    """What is wrong with the key at ``loc`` and how to fix it."""
    key = _show(".".join(loc))
    kind = error["type"]
    value = error.get("input")
    model = section_model(root, loc[:-1], optional=True)
    if kind == "missing":
        return f"missing required key '{key}'"
    if kind == "extra_forbidden":
        prefix = ".".join(loc[:-1]) + "." if len(loc) > 1 else ""
        hint = suggest(loc[-1], model.model_fields, prefix) if model is not None else ""
        if not hint and model is not None:
            hint = f" (allowed: {', '.join(model.model_fields)})"
        return f"unknown key '{key}'{hint}"
    text = error["msg"].removeprefix("Value error, ")
    if kind == "model_type":  # pydantic names the class: "instance of ModelConfig"
        text = "expected a section of settings (indented key: value lines)"
    message = f"{key}: {text}" if key else text
    if kind not in ("value_error", "assertion_error") and not isinstance(value, dict):
        shown = repr(value)
        message += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    field = model.model_fields.get(loc[-1]) if model is not None and loc else None
    if kind == "literal_error" and field is not None:
        message += suggest(str(value), [str(a) for a in _literals(field.annotation)])
    return message


def _literals(annotation: Any) -> list[Any]:
    """The values of the ``Literal`` types in ``annotation`` (itself or a union member)."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [v for arg in typing.get_args(annotation) for v in _literals(arg)]


def _union_field(root: type[BaseModel], loc: tuple[str, ...]) -> int:
    """Length of the field part of ``loc`` when the rest starts with a union member, else 0.

    Pydantic tries each member of a union (``float | tuple[float, float]``) and
    reports every failure under the member's name (``...blocks.float``); they
    are one problem of one key.
    """
    for end in range(1, len(loc)):
        model = section_model(root, loc[: end - 1], optional=True)
        field = model.model_fields.get(loc[end - 1]) if model is not None else None
        if field is None or typing.get_origin(field.annotation) not in (
            typing.Union,
            types.UnionType,
        ):
            continue
        if len([a for a in typing.get_args(field.annotation) if a is not type(None)]) > 1:
            return end
    return 0


def _merge_unions(root: type[BaseModel], errors: list[Any]) -> list[dict[str, Any]]:
    """``errors`` with the failures of one union field's members joined into one error."""
    merged: list[dict[str, Any]] = []
    at: dict[tuple[Any, ...], dict[str, Any]] = {}
    for error in errors:
        loc = tuple(error["loc"])
        end = _union_field(root, tuple(str(part) for part in loc))
        if not end:
            merged.append(dict(error))
            continue
        text = error["msg"].removeprefix("Value error, ")
        if loc[:end] in at:
            texts = at[loc[:end]]["texts"]
            if text not in texts:
                texts.append(text)
            continue
        entry = {**error, "loc": loc[:end], "texts": [text]}
        at[loc[:end]] = entry
        merged.append(entry)
    for entry in at.values():
        texts = entry.pop("texts")
        should = "Input should be "
        if all(t.startswith(should) for t in texts):
            rest = [t.removeprefix(should) for t in texts]
            entry["msg"] = should + (
                ", ".join(rest[:-1]) + " or " + rest[-1] if len(rest) > 1 else rest[0]
            )
        else:
            entry["msg"] = "; ".join(texts)
    return merged


def _where(
    loc: tuple[str, ...], kind: str, source: str, lines: Lines, origins: Origins
) -> tuple[tuple[int, int], str]:
    """Name the override that set ``loc``, else the file and the nearest known line.

    Also returns where that is in the order problems are listed: the file's
    lines first, then the overrides in the order given, then the rest.
    """
    order = {text: i for i, text in enumerate(origins.values())}
    latest_first = list(reversed(origins.items()))
    for path, text in latest_first:  # the override set this key or a section holding it
        if loc[: len(path)] == path:
            return (1, order[text]), f"override '{_show(text)}'"
    if loc in lines and kind != "missing":
        return (0, lines[loc]), f"{source}:{lines[loc]}"
    for path, text in latest_first:  # the override wrote below this key (optim.lr.x=1)
        if path[: len(loc)] == loc and loc:
            return (1, order[text]), f"override '{_show(text)}'"
    if kind != "missing":  # a missing key has no line; its section's line would mislead
        for end in range(len(loc) - 1, 0, -1):
            if loc[:end] in lines:
                return (0, lines[loc[:end]]), f"{source}:{lines[loc[:end]]}"
    return (2, 0), source
