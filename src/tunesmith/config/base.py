"""Pieces shared by every config section: strict models and helpful choice errors."""

from __future__ import annotations

import difflib
import json
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to ``word``, or None when none is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def suggest(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """Return `` (did you mean '<prefix><closest>'?)`` or ``""`` when nothing is close."""
    match = closest(word, choices)
    return f" (did you mean '{prefix}{match}'?)" if match is not None else ""


def check_choice(kind: str, value: str, allowed: Sequence[str]) -> str:
    """Validate ``value`` against ``allowed`` with an error that lists and suggests."""
    if value not in allowed:
        raise ValueError(
            f"unknown {kind} {value!r}{suggest(value, allowed)}; allowed: {', '.join(allowed)}"
        )
    return value


class Section(BaseModel):
    """Base of every section: unknown keys are errors, so typos cannot go unnoticed."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def changed_from_default(section: BaseModel, names: Iterable[str]) -> list[str]:
    """The ``names`` whose value differs from the field's default.

    For "only read with ..." checks: a saved config lists every key with its
    value, so which keys were *given* says nothing; which differ does.
    """
    fields = type(section).model_fields
    return [n for n in names if getattr(section, n) != fields[n].get_default()]


def section_model(
    root: type[BaseModel], path: Sequence[str], *, optional: bool = False
) -> type[BaseModel] | None:
    """Return the model class validating the mapping at ``path`` (``()`` is ``root``).

    A ``dict[str, Section]`` field (``multitask.tasks``) consumes the next part as
    its key. With ``optional``, an optional sub-section (``S | None``) counts as ``S``.
    """
    model = root
    parts = iter(path)
    for part in parts:
        field = model.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        if typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
            if next(parts, None) is None:
                return None
        if optional:
            annotation = _optional_section(annotation) or annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _type_name(annotation: Any) -> str:
    """Render a field type the way a YAML user reads it: ``int | null``, ``"a" | "b"``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(json.dumps(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    if annotation is type(None):
        return "null"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _optional_section(annotation: Any) -> type[BaseModel] | None:
    """``S`` when a field is ``S | None`` for a section ``S`` (an optional sub-section)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType) or len(args) != 2:
        return None
    inner = [a for a in args if a is not type(None)]
    if len(inner) == 1 and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):
        return inner[0]
    return None


def field_docs(model_cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """List ``(dotted key, type and default, description)`` for every leaf setting.

    The field descriptions are the reference documentation; this feeds ``--help``
    and generated docs so they cannot drift from what the validator accepts. An
    optional sub-section gets a row of its own (null: off) and one per key.
    """
    rows: list[tuple[str, str, str]] = []
    for name, field in model_cls.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(field_docs(annotation, f"{key}."))
            continue
        optional = _optional_section(annotation)
        if optional is not None:
            rows.append((key, "section | null = null", field.description or ""))
            rows.extend(field_docs(optional, f"{key}."))
            continue
        kind = _type_name(annotation)
        default = field.get_default(call_default_factory=True)
        kind += " (required)" if field.is_required() else f" = {json.dumps(default, default=str)}"
        rows.append((key, kind, field.description or ""))
    return rows
