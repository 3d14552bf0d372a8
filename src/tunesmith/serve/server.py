"""What the routes of ``tunesmith serve`` share: limits, state, request parsing.

``Server`` holds the catalog, the scheduler, the metrics and the limits, and
answers the questions every route asks (is there room for one more request,
which model does this id name); the functions below turn a request body into
what the generator takes, refusing bad input with OpenAI's error object.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from tunesmith.data.chat import chat_record
from tunesmith.errors import GenerationError, TunesmithError
from tunesmith.models.completions import GenerationRequest, check_request, encode_prompt
from tunesmith.serve.catalog import Catalog, Served
from tunesmith.serve.metrics import Metrics
from tunesmith.serve.scheduler import Scheduler
from tunesmith.serve.schemas import ApiError, ChatBody, SamplingBody
from tunesmith.tasks.chat_template import render, resolve_template


@dataclass(frozen=True)
class ServeSettings:
    """The server's limits (``tunesmith serve --help`` sets each)."""

    api_key: str | None = None
    max_body_bytes: int = 1_000_000
    max_tokens: int = 1024
    max_n: int = 8
    max_inputs: int = 256
    max_concurrent: int = 64
    max_batch: int = 32
    max_wait_ms: float = 10.0


class Server:
    """What the routes share: the catalog, the scheduler, the metrics and the limits."""

    def __init__(self, catalog: Catalog, settings: ServeSettings) -> None:
        self.catalog = catalog
        self.settings = settings
        self.metrics = Metrics()
        self.scheduler = Scheduler(
            self.metrics, max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1000
        )
        self.in_flight = 0
        for name, served in catalog.served.items():
            self.metrics.track(name, served.manifest.get("data_profile"))

    def admit(self) -> Callable[[], None]:
        """Count a request in flight (429 beyond the limit); returns its release."""
        if self.in_flight >= self.settings.max_concurrent:
            raise ApiError(
                429,
                f"too many requests in flight (limit {self.settings.max_concurrent}); retry later",
                kind="rate_limit_error",
                code="rate_limit_exceeded",
            )
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1

        return release

    def model(self, name: str, *, generative: bool) -> Served:
        """The served model ``name`` for a generation (or classification) route."""
        try:
            served = self.catalog.get(name)
        except KeyError:
            raise ApiError(
                404,
                f"model '{name}' is not served (have: {', '.join(self.catalog.names())})",
                param="model",
                code="model_not_found",
            ) from None
        if generative and not served.generative:
            task = served.cfg.task.type
            where = (
                "use /v1/classify"
                if task in _CLASSIFIERS
                else "completions are served for decoder-only language models"
            )
            raise ApiError(400, f"model '{name}' is a {task} model: {where}", param="model")
        if not generative and served.cfg.task.type not in _CLASSIFIERS:
            raise ApiError(
                400,
                f"model '{name}' ({served.cfg.task.type}) does not classify; /v1/classify serves "
                f"{', '.join(sorted(_CLASSIFIERS))} models",
                param="model",
            )
        return served

    def submit(self, job: Any, request: Request) -> Any:
        """Queue ``job``; the request stops counting as arriving (see ``_guard``)."""
        if getattr(request.state, "arriving", False):  # first: a woken round sees it gone
            request.state.arriving = False
            self.scheduler.arrive(-1)
        return self.scheduler.submit(job)

    async def run(self, job: Any, request: Request) -> Any:
        """Queue ``job`` and wait for it; model errors become 400 (bad input) or 500."""
        try:
            return await asyncio.wrap_future(self.submit(job, request))
        except (GenerationError, TunesmithError) as err:
            raise ApiError(400, str(err)) from None


_CLASSIFIERS = {"sequence_classification", "token_classification", "reward_model"}


# -- request parsing ---------------------------------------------------------------------
async def parse(request: Request, schema: type[BaseModel], limit: int) -> Any:
    """The body as ``schema``; 413 beyond ``limit`` bytes, 400 for bad JSON or parameters."""
    chunks, size = [], 0
    async for chunk in request.stream():  # never more than the limit in memory
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise ApiError(400, f"the body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {message}" if param else message, param=param) from None


def chat_prompt(served: Served, body: ChatBody) -> list[int]:
    """The chat's token ids as the run rendered prompts (its template and system prompt).

    Never shortened: a prompt that leaves no room for ``max_tokens`` within the
    model's positions is refused (400), not cut.
    """
    turns = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages
    ]
    if turns[-1]["role"] != "user":
        raise ApiError(400, "messages: the last message must be the user's", param="messages")
    try:
        record = chat_record(
            turns, "request", labelled=False, system_prompt=served.cfg.task.system_prompt
        )
        template = resolve_template(served.tokenizer, served.cfg.task.chat_template)
        text = render(served.tokenizer, record["messages"], template, prompt=True)
    except TunesmithError as err:
        raise ApiError(400, f"messages: {err}", param="messages") from None
    return encode_prompt(served.tokenizer, text)


def generation_request(
    server: Server,
    served: Served,
    body: SamplingBody,
    budget: int | None,
    prompt: list[int],
    on_text: Callable[[int, str], None] | None = None,
) -> GenerationRequest:
    """The generator's request for ``body``; 400 naming the setting that is refused."""
    limits = server.settings
    if body.n > limits.max_n:
        raise ApiError(400, f"n: at most {limits.max_n}", param="n")
    tokens = budget if budget is not None else served.cfg.generate.max_new_tokens
    if tokens > limits.max_tokens:
        raise ApiError(
            400,
            f"max_tokens: {tokens} exceeds this server's limit of {limits.max_tokens}",
            param="max_tokens",
        )
    request = GenerationRequest(
        prompt,
        max_new_tokens=tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=tuple(body.stop or ()),
        n=body.n,
        seed=body.seed,
        adapter=served.adapter,
        on_text=on_text,
    )
    try:
        check_request(request, prompt, served.tree.generator.max_positions)  # type: ignore[union-attr]
    except GenerationError as err:
        raise ApiError(400, str(err).removeprefix("generation request refused: ")) from None
    return request


def server_of(request: Request) -> Server:
    """The ``Server`` of the application answering ``request``."""
    return request.app.state.server
