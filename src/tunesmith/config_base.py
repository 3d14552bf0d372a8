"""Pieces shared by every config section: strict models and helpful choice errors."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ConfigDict


def suggest(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """Return `` (did you mean '<prefix><closest>'?)`` or ``""`` when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


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
