"""Sampling a trial's config changes from the ``search`` section with Optuna.

Each searched key becomes one Optuna parameter of the same name; the sampled
value becomes a dotted override (``optim.lr=0.00031``), applied after the
config file and the command line's overrides, so a trial's config is exactly
``Config.load(file, overrides + sampled)`` and is validated like any other.
Categorical choices that Optuna cannot store (lists, mappings) are stored as
their JSON text and decoded back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tunesmith.config.tune import Distribution

_SCALAR = (str, int, float, bool, type(None))


def suggest(trial: Any, space: Mapping[str, Distribution]) -> dict[str, Any]:
    """One value per searched key, sampled by ``trial`` (an ``optuna.Trial``)."""
    values: dict[str, Any] = {}
    for key, dist in space.items():
        kind = dist.kind
        if kind == "loguniform":
            low, high = dist.bounds(kind)
            values[key] = trial.suggest_float(key, low, high, log=True)
        elif kind == "uniform":
            low, high = dist.bounds(kind)
            values[key] = trial.suggest_float(key, low, high)
        elif kind == "int":
            low, high = dist.bounds(kind)
            values[key] = trial.suggest_int(key, low, high)
        else:
            values[key] = _categorical(trial, key, dist.bounds(kind))
    return values


def _categorical(trial: Any, key: str, choices: list[Any]) -> Any:
    if all(isinstance(c, _SCALAR) for c in choices):
        return trial.suggest_categorical(key, choices)
    encoded = trial.suggest_categorical(key, [json.dumps(c) for c in choices])
    return json.loads(encoded)


def decode(params: Mapping[str, Any], space: Mapping[str, Distribution]) -> dict[str, Any]:
    """A stored trial's parameters as config values (categorical JSON text decoded)."""
    out = {}
    for key, value in params.items():
        dist = space.get(key)
        choices = dist.bounds("categorical") if dist is not None else None
        scalar = choices is None or all(isinstance(c, _SCALAR) for c in choices)
        out[key] = value if scalar else json.loads(value)
    return out


def as_overrides(values: Mapping[str, Any]) -> list[str]:
    """Dotted overrides; values as JSON, which the override parser reads as YAML."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]
