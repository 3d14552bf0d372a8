"""Rendering chats with a chat template and marking the tokens to train on.

The loss of instruction tuning covers only the assistant's replies: system
and user turns and the template's own markup are context, not targets. We
find each reply's character span in the rendered text and label the tokens
that overlap it (through the fast tokenizer's offsets), which works for any
template without special ``{% generation %}`` markers:

- the text before reply *i* is the template rendered over the turns before
  it with the generation prompt, so the reply starts after that prefix
  (a template whose renders are not prefixes of each other is refused);
- the reply ends with its content, plus the end-of-sequence token when the
  template writes it right after (the model must learn to stop).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunesmith.errors import DataError, ModelError

#: A minimal template for tokenizers without one (``task.chat_template: plain``).
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
IGNORE = -100
Span = tuple[int, int]


def resolve_template(tokenizer: Any, configured: str | None) -> str:
    """The template to use: the configured one ('plain' built in), else the tokenizer's.

    Raises:
        ModelError: Neither the config nor the tokenizer has a template.
    """
    if configured == "plain":
        return PLAIN_TEMPLATE
    if configured:
        return configured
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        where = getattr(tokenizer, "name_or_path", "") or "the model folder"
        raise ModelError(
            f"{where}: the tokenizer has no chat template; set task.chat_template to a Jinja "
            "template, or to 'plain' for a minimal built-in one"
        )
    return template


def render(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    template: str,
    *,
    prompt: bool = False,
    tools: Sequence[dict[str, Any]] | None = None,
) -> str:
    """The chat as text; ``prompt`` appends the assistant header generation continues from.

    ``tools`` (function definitions) go to the template, which may list them
    in the system turn; templates that ignore them are caught by ``check_tools_kept``.
    """
    return tokenizer.apply_chat_template(
        list(messages),
        chat_template=template,
        tokenize=False,
        add_generation_prompt=prompt,
        **({"tools": list(tools)} if tools else {}),
    )


def check_tools_kept(tokenizer: Any, record: dict[str, Any], template: str) -> None:
    """Refuse a row whose tools, tool calls or tool results the chat template drops.

    A template that ignores them (SmolLM2's ignores ``tools``) would train the
    row silently without them: the model would learn to answer as if it had
    called nothing. Compared by rendering with and without each part.

    Raises:
        DataError: Naming the row and what the template drops.
    """
    messages, tools = record["messages"], record.get("tools")
    calls = any(m.get("tool_calls") for m in messages)
    results = [m for m in messages if m["role"] == "tool"]
    if not (tools or calls or results):
        return
    source = record.get("source", "a row")
    try:
        full = render(tokenizer, messages, template, tools=tools)
        if tools and full == render(tokenizer, messages, template):
            dropped = "the tools column"
        elif calls and full == render(
            tokenizer,
            [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages],
            template,
            tools=tools,
        ):
            dropped = "the assistant's tool_calls"
        elif any(m["content"] not in full for m in results):
            dropped = "the tool results"
        else:
            return
    except Exception as err:  # jinja raises its own errors for what a template cannot render
        raise DataError(
            f"{source}: the chat template cannot render this row's tool use ({err}); use a "
            "template that supports tools (task.chat_template) or drop the row"
        ) from None
    raise DataError(
        f"{source}: the chat template drops {dropped}, so the row would be trained without "
        "them; use a chat template that renders tools (task.chat_template) or remove the "
        "tool use from the row"
    )


def reply_spans(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    template: str,
    *,
    last_only: bool = False,
    tools: Sequence[dict[str, Any]] | None = None,
) -> tuple[str, list[Span]]:
    """The rendered chat and the character spans of the assistant replies to train on.

    A turn that calls tools is trained whole (the call is what the model must
    learn to write); tool results, like user turns, are context.

    Raises:
        ModelError: The template renders a shorter chat as something that is
            not a prefix of the longer one (replies cannot be located).
    """
    full = render(tokenizer, messages, template, tools=tools)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if last_only:
        turns = turns[-1:]
    eos = getattr(tokenizer, "eos_token", None)
    spans = []
    for i in turns:
        before = render(tokenizer, messages[:i], template, prompt=True, tools=tools)
        if not full.startswith(before):
            raise ModelError(
                "the chat template renders the turns before a reply differently from the whole "
                "chat, so the reply cannot be located; use a template whose renders extend "
                "each other (set task.chat_template)"
            )
        content = messages[i]["content"]
        start = (
            -1 if messages[i].get("tool_calls") or not content else full.find(content, len(before))
        )
        if start < 0:  # a tool call, or the template rewrote the reply: train its whole turn
            start = len(before)
            turn = render(tokenizer, messages[: i + 1], template, tools=tools)
            end = len(turn.rstrip()) if full.startswith(turn.rstrip()) else len(full.rstrip())
        else:
            end = start + len(content)
            if eos and full.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
    return full, spans


def label_tokens(offsets: Sequence[Span], ids: Sequence[int], spans: Sequence[Span]) -> list[int]:
    """Labels for tokens with character ``offsets``: the id inside a span, -100 elsewhere."""
    labels = []
    for (a, b), token in zip(offsets, ids, strict=True):
        inside = b > a and any(a < e and b > s for s, e in spans)
        labels.append(token if inside else IGNORE)
    return labels


def end_of_turn_id(tokenizer: Any, messages: Sequence[dict[str, str]], template: str) -> int | None:
    """The token the template ends a reply with: the special token right after its content.

    Read off one rendered chat ending with a reply (ChatML writes
    ``<|im_end|>``, Llama 3 ``<|eot_id|>``, the plain template EOS); when the
    template writes no special token there, the tokenizer's EOS (None if it
    has none). Training must reach this token or the model never learns to stop.
    """
    full = render(tokenizer, messages, template)
    content = messages[-1]["content"]
    at = full.rfind(content)
    if at >= 0:
        after = tokenizer(full[at + len(content) :], add_special_tokens=False)["input_ids"]
        special = set(getattr(tokenizer, "all_special_ids", ()))
        special |= {
            i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special
        }
        if after and after[0] in special:
            return after[0]
    return getattr(tokenizer, "eos_token_id", None)
