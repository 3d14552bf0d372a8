"""Preference pairs: ``prompt``, ``chosen``, ``rejected``, each text or a list of messages.

Text becomes one turn (the prompt a user turn, the answers assistant turns);
lists are validated as messages. Without a ``prompt`` column (TRL's implicit
prompt) ``chosen`` and ``rejected`` are whole conversations and their shared
leading messages are the prompt. The record's ``messages`` are prompt +
chosen, which is what supervised fine-tuning on preference data trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tunesmith.data.formats.base import (
    Layout,
    Message,
    Parts,
    ReadOptions,
    blank,
    parse_messages,
    turn,
)
from tunesmith.errors import DataError

ANSWERS = ("chosen", "rejected")
#: Optional column: how much better chosen is (reward models' Bradley-Terry margin).
MARGIN = "margin"


def side(source: str, column: str, value: Any, role: str) -> list[Message] | None:
    """A cell as messages: text is one ``role`` turn; None when blank."""
    if blank(value):
        return None
    if isinstance(value, str):
        return [turn(role, value)]
    return parse_messages(source, column, value)


def convert(source: str, raw: Mapping[str, Any], opts: ReadOptions) -> Parts | None:
    """The prompt and both answers as messages; None when one is blank."""
    column = opts.prompt_column
    has_prompt = column in raw
    prompt = side(source, column, raw.get(column), "user") if has_prompt else []
    if prompt is None:
        return None
    if not opts.labelled:
        return {"messages": prompt, "prompt": prompt} if prompt else None
    answers = {name: side(source, name, raw.get(name), "assistant") for name in ANSWERS}
    if any(a is None for a in answers.values()):
        return None
    chosen, rejected = answers["chosen"], answers["rejected"]
    if not has_prompt:
        prompt, chosen, rejected = implicit_prompt(source, chosen, rejected)
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if answer[0]["role"] != "assistant":
            raise DataError(f"{source}: {name} must start with the assistant's answer")
    record = {"messages": prompt + chosen, "prompt": prompt, "chosen": chosen, "rejected": rejected}
    if not blank(raw.get(MARGIN)):  # reward models: by how much chosen is better
        record[MARGIN] = margin(source, raw[MARGIN])
    return record


def margin(source: str, value: Any) -> float:
    """An optional ``margin`` cell: a finite number.

    Raises:
        DataError: Anything else, naming the row.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if number != number or number in (float("inf"), float("-inf")):
        raise DataError(f"{source}: column 'margin' must be a number, got {value!r}")
    return number


def implicit_prompt(
    source: str, chosen: list[Message], rejected: list[Message]
) -> tuple[list[Message], list[Message], list[Message]]:
    """Split two whole conversations into their shared leading turns and the two answers.

    Raises:
        DataError: They share no turn, or no answer differs.
    """
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n and chosen[n - 1]["role"] == "assistant":  # the answers start at an assistant turn
        n -= 1
    if n == 0 or n == len(chosen) or n == len(rejected):
        raise DataError(
            f"{source}: without a prompt column, chosen and rejected must be conversations "
            "that share their first turns (the prompt) and differ in the answer"
        )
    return chosen[:n], chosen[n:], rejected[n:]


LAYOUT = Layout(
    "preference",
    indicators=lambda o: list(ANSWERS),
    required=lambda o: {name: name for name in ANSWERS} if o.labelled else {},
    convert=convert,
)
