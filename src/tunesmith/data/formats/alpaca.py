"""Alpaca rows: ``instruction``, optional ``input`` (appended after a blank line), ``output``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tunesmith.data.formats.base import Layout, Parts, ReadOptions
from tunesmith.data.formats.prompt_response import pair


def prompt(raw: Mapping[str, Any]) -> Any:
    """The instruction, with the input after a blank line when there is one."""
    instruction, extra = raw.get("instruction"), raw.get("input")
    if isinstance(instruction, str) and isinstance(extra, str) and extra.strip():
        return f"{instruction}\n\n{extra}"
    return instruction


def convert(source: str, raw: Mapping[str, Any], opts: ReadOptions) -> Parts | None:
    """The instruction (and input) as the user turn, the output as the reply."""
    reply = ("output", raw.get("output")) if opts.labelled else None
    return pair(source, ("instruction", prompt(raw)), reply)


LAYOUT = Layout(
    "alpaca",
    indicators=lambda o: ["instruction"],
    required=lambda o: (
        {"instruction": "instruction", "output": "output"}
        if o.labelled
        else {"instruction": "instruction"}
    ),
    convert=convert,
)
