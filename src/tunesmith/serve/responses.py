"""OpenAI's response shapes: chat and text completions, their streamed chunks, usage."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from tunesmith.models.completions import GenerationResult


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def result_usage(results: Sequence[GenerationResult]) -> dict[str, int]:
    return usage(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results))


def chat_completion(rid: str, model: str, result: GenerationResult) -> dict[str, Any]:
    """``chat.completion``: one choice per completion of the request."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            for i, c in enumerate(result.completions)
        ],
        "usage": result_usage([result]),
    }


def text_completion(rid: str, model: str, results: Sequence[GenerationResult]) -> dict[str, Any]:
    """``text_completion``: prompts in order, each prompt's ``n`` completions in a row."""
    choices = []
    for result in results:
        for c in result.completions:
            choices.append(
                {
                    "index": len(choices),
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                    "logprobs": None,
                }
            )
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": result_usage(results),
    }


def chunk(
    rid: str,
    model: str,
    *,
    chat: bool,
    index: int | None = None,
    text: str | None = None,
    role: bool = False,
    finish: str | None = None,
    use: dict[str, int] | None = None,
) -> str:
    """One server-sent event of a streamed completion (``data: {...}``)."""
    choices: list[dict[str, Any]] = []
    if index is not None:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choices.append({"index": index, "delta": delta, "finish_reason": finish})
        else:
            choices.append(
                {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
            )
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if use is not None:
        body["usage"] = use
    return f"data: {json.dumps(body)}\n\n"


DONE = "data: [DONE]\n\n"
