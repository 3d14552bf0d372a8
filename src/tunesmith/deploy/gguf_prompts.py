"""The prompts an exported GGUF file is checked on.

Two kinds, because they catch different faults: prompts from the run's own
validation chats, rendered through the chat template the run trained with
(what users will send, and where the model learned to stop), and fixed
prompts with the characters tokenizers disagree on: digits (split one by one
or in runs, by pre-tokenizer), runs of spaces and tabs, blank lines, and
non-ASCII letters, symbols and emoji (byte-level fallbacks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunesmith.tasks.chat_template import render

#: Texts whose tokenisation differs between pre-tokenizers and byte handling.
FIXED_PROMPTS = (
    "What is 12345 + 67890? Write 2026-12-05 and 3.14159 as digits.",
    "Spaces:    four,  two, then\ttab\t\tand trailing   ",
    "Line one\nLine two\n\n\nafter three newlines\n",
    "Café, naïve, Straße, Ελληνικά, Привет, 東京 and 🙂 — done.",
)
#: Characters of a document's start used as a prompt (documents have no chat turns).
_DOCUMENT_CHARS = 400


@dataclass(frozen=True)
class CheckPrompt:
    """One prompt as the runtime receives it (template already applied)."""

    source: str
    text: str


def check_prompts(
    tokenizer: Any, template: str | None, records: Sequence[dict[str, Any]], n: int
) -> list[CheckPrompt]:
    """Up to ``n`` prompts from ``records`` (validation rows), then the fixed prompts.

    A chat is cut before its last assistant reply and rendered with the
    generation prompt, so the model's next tokens are that reply; a document
    (``data.format: text``) gives its first characters. Without a template
    the fixed prompts are sent as plain text.
    """
    prompts: list[CheckPrompt] = []
    for i, record in enumerate(records):
        if len(prompts) >= n:
            break
        source = str(record.get("source", f"validation {i}"))
        if "messages" not in record:
            prompts.append(CheckPrompt(source, str(record["text"])[:_DOCUMENT_CHARS]))
            continue
        messages = list(record["messages"])
        turns = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
        if template is None or not turns or turns[-1] == 0:
            continue
        text = render(tokenizer, messages[: turns[-1]], template, prompt=True)
        prompts.append(CheckPrompt(source, text))
    for i, text in enumerate(FIXED_PROMPTS):
        chat = [{"role": "user", "content": text}]
        rendered = render(tokenizer, chat, template, prompt=True) if template else text
        prompts.append(CheckPrompt(f"fixed {i}", rendered))
    return prompts
