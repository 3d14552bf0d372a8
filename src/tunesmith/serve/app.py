"""The HTTP side of ``tunesmith serve``: OpenAI-compatible routes over the scheduler.

Routes: ``/v1/chat/completions``, ``/v1/completions`` (streamed as server-sent
events on request), ``/v1/classify`` (classifiers and taggers), ``/v1/models``,
``/health``, ``/metrics`` and the admin routes ``POST /admin/models`` and
``DELETE /admin/models/{id}`` that load and unload models while serving.

Guards, in the order a request meets them: the API key (401; compared in
constant time; ``/health`` is open), the body size (413), the number of
requests in flight (429), JSON and parameter checks (400, naming the
parameter), the model id (404). Every error is OpenAI's error object; an
unexpected failure is logged and answered 500 without a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.data.chat import chat_record
from tunesmith.errors import GenerationError, TunesmithError
from tunesmith.models.completions import (
    GenerationRequest,
    GenerationResult,
    check_request,
    encode_prompt,
)
from tunesmith.serve import responses as shapes
from tunesmith.serve.catalog import Catalog, Served
from tunesmith.serve.metrics import Metrics, prometheus
from tunesmith.serve.scheduler import CallJob, ClassifyJob, GenerateJob, Scheduler
from tunesmith.serve.schemas import (
    ApiError,
    ChatBody,
    ClassifyBody,
    CompletionBody,
    LoadBody,
    SamplingBody,
)
from tunesmith.tasks.chat_template import render, resolve_template

log = logging.getLogger(__name__)

#: Paths answered without the API key.
_OPEN = {"/health"}
#: Paths whose requests become scheduler jobs.
_MODEL_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/classify"}


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


# -- the application ------------------------------------------------------------------
def create_app(catalog: Catalog, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``catalog`` under ``settings``."""
    server = Server(catalog, settings or ServeSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.scheduler.start()
        yield
        server.scheduler.stop()

    app = FastAPI(title="tunesmith", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            ApiError(err.status_code, str(err.detail), kind=kind).body(), err.status_code
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("request %s failed", request.url.path)
        body = ApiError(500, "internal error (see the server log)", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.middleware("http")
    async def _guard(request: Request, call_next: Any) -> Any:
        error = _refusal(request, server.settings)
        response = JSONResponse(error.body(), status_code=error.status) if error else None
        if response is None:
            # A model request is announced while its body is read and checked, so
            # that a round about to start waits for it (and only then waits).
            request.state.arriving = request.url.path in _MODEL_ROUTES
            if request.state.arriving:
                server.scheduler.arrive()
            try:
                response = await call_next(request)
            except Exception as err:  # pragma: no cover - handlers above answer first
                response = await _unexpected(request, err)
            finally:
                if request.state.arriving:  # refused before it was submitted
                    server.scheduler.arrive(-1)
        server.metrics.response(response.status_code)
        return response

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": catalog.names()}

    @app.get("/metrics")
    async def metrics(format: str = "json") -> Any:
        snap = server.metrics.snapshot(server.scheduler.queued, server.in_flight)
        return PlainTextResponse(prometheus(snap)) if format == "prometheus" else snap

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(catalog.get(n)) for n in catalog.names()]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body: ChatBody = await parse(request, ChatBody, server.settings.max_body_bytes)
        served = server.model(body.model, generative=True)
        prompt = chat_prompt(served, body)
        return await _complete(
            server, request, served, body, body.token_budget, [prompt], chat=True
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body: CompletionBody = await parse(request, CompletionBody, server.settings.max_body_bytes)
        served = server.model(body.model, generative=True)
        if not 1 <= len(body.prompts) <= server.settings.max_inputs:
            raise ApiError(
                400, f"prompt: 1 to {server.settings.max_inputs} prompts", param="prompt"
            )
        if body.stream and len(body.prompts) > 1:
            raise ApiError(400, "prompt: stream one prompt at a time", param="prompt")
        prompts = [encode_prompt(served.tokenizer, p) for p in body.prompts]
        return await _complete(
            server, request, served, body, body.token_budget, prompts, chat=False
        )

    @app.post("/v1/classify")
    async def classify(request: Request) -> Any:
        body: ClassifyBody = await parse(request, ClassifyBody, server.settings.max_body_bytes)
        served = server.model(body.model, generative=False)
        texts = body.texts
        if not 1 <= len(texts) <= server.settings.max_inputs or not all(texts):
            raise ApiError(
                400, f"input: 1 to {server.settings.max_inputs} non-empty texts", param="input"
            )
        release = server.admit()
        started = time.perf_counter()
        try:
            records = served.task.text_records(texts)
            features = served.task.encode(records, served.tokenizer, None)
            rows = await server.run(ClassifyJob(served, records, features), request)
        except ApiError:
            server.metrics.request(served.name, time.perf_counter() - started, ok=False)
            raise
        finally:
            release()
        lengths = [len(f["input_ids"]) for f in features]
        server.metrics.request(
            served.name,
            time.perf_counter() - started,
            ok=True,
            prompt_tokens=sum(lengths),
            input_tokens=lengths,
            predicted=[r["label"] for r in rows if isinstance(r.get("label"), str)],
        )
        data = [
            {"index": i, **{k: v for k, v in row.items() if k != "text"}}
            for i, row in enumerate(rows)
        ]
        return {
            "object": "list",
            "model": served.name,
            "data": data,
            "usage": {"prompt_tokens": sum(lengths), "total_tokens": sum(lengths)},
        }

    @app.post("/admin/models")
    async def load(request: Request) -> Any:
        _admin_allowed(server)
        body: LoadBody = await parse(request, LoadBody, server.settings.max_body_bytes)
        if body.model in catalog.served:
            raise ApiError(409, f"model '{body.model}' is already served", param="model")
        job = CallJob(lambda: catalog.add_from_library(body.model, body.path))
        served = await server.run(job, request)
        server.metrics.track(served.name, served.manifest.get("data_profile"))
        return _model_card(served)

    @app.delete("/admin/models/{name}")
    async def unload(name: str, request: Request) -> Any:
        _admin_allowed(server)
        if name not in catalog.served:
            raise ApiError(
                404, f"model '{name}' is not served", param="model", code="model_not_found"
            )
        await server.run(CallJob(lambda: catalog.remove(name)), request)
        return {"id": name, "object": "model", "deleted": True}

    return app


def _refusal(request: Request, settings: ServeSettings) -> ApiError | None:
    """The key and the declared body size, checked before a body is read."""
    if settings.api_key is not None and request.url.path not in _OPEN:
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            return ApiError(
                401,
                "missing or wrong API key (Authorization: Bearer KEY)",
                kind="authentication_error",
                code="invalid_api_key",
            )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
        return ApiError(413, f"request body exceeds the limit of {settings.max_body_bytes} bytes")
    return None


def _admin_allowed(server: Server) -> None:
    if server.settings.api_key is None:
        raise ApiError(
            403,
            "the admin routes are off: start the server with --api-key to use them",
            kind="permission_error",
        )


def _model_card(served: Served) -> dict[str, Any]:
    return {
        "id": served.name,
        "object": "model",
        "created": int(served.folder.stat().st_mtime),
        "owned_by": "tunesmith",
        "task": served.cfg.task.type,
        "method": served.method,
        "base_model": served.manifest.get("base_model"),
        "labels": served.labels or None,
    }


async def _complete(
    server: Server,
    http: Request,
    served: Served,
    body: SamplingBody,
    budget: int | None,
    prompts: list[list[int]],
    *,
    chat: bool,
) -> Any:
    """Answer a chat or text completion, whole or streamed."""
    if body.stream:
        return await _stream(server, http, served, body, budget, prompts[0], chat=chat)
    requests = [generation_request(server, served, body, budget, p) for p in prompts]
    release = server.admit()
    started = time.perf_counter()
    try:
        results: list[GenerationResult] = list(
            await asyncio.gather(*(server.run(GenerateJob(served, r), http) for r in requests))
        )
    except ApiError:
        server.metrics.request(served.name, time.perf_counter() - started, ok=False)
        raise
    finally:
        release()
    _record(server, served, results, time.perf_counter() - started)
    rid = shapes.new_id("chatcmpl" if chat else "cmpl")
    if chat:
        return shapes.chat_completion(rid, served.name, results[0])
    return shapes.text_completion(rid, served.name, results)


def _record(
    server: Server, served: Served, results: list[GenerationResult], seconds: float
) -> None:
    server.metrics.request(
        served.name,
        seconds,
        ok=True,
        prompt_tokens=sum(r.prompt_tokens for r in results),
        completion_tokens=sum(r.completion_tokens for r in results),
        input_tokens=[r.prompt_tokens for r in results],
    )


async def _stream(
    server: Server,
    http: Request,
    served: Served,
    body: SamplingBody,
    budget: int | None,
    prompt: list[int],
    *,
    chat: bool,
) -> StreamingResponse:
    """Server-sent events: text deltas as they are decoded, then each choice's finish."""
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()

    def on_text(row: int, delta: str) -> None:
        loop.call_soon_threadsafe(deltas.put_nowait, (row, delta))

    request = generation_request(server, served, body, budget, prompt, on_text)
    release = server.admit()
    started = time.perf_counter()
    job = GenerateJob(served, request)
    server.submit(job, http)
    job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(deltas.put_nowait, None))
    rid = shapes.new_id("chatcmpl" if chat else "cmpl")

    async def events() -> AsyncIterator[str]:
        try:
            if chat:
                for i in range(request.n):
                    yield shapes.chunk(rid, served.name, chat=True, index=i, text="", role=True)
            while (item := await deltas.get()) is not None:
                row, text = item
                if text:
                    yield shapes.chunk(rid, served.name, chat=chat, index=row, text=text)
            error = job.future.exception()
            if error is not None:
                server.metrics.request(served.name, time.perf_counter() - started, ok=False)
                status = 400 if isinstance(error, TunesmithError) else 500
                message = str(error) if status == 400 else "internal error (see the server log)"
                if status == 500:
                    log.error("streamed request failed: %s", error)
                yield f"data: {json.dumps(ApiError(status, message).body())}\n\n"
                return
            result: GenerationResult = job.future.result()
            for i, c in enumerate(result.completions):
                yield shapes.chunk(rid, served.name, chat=chat, index=i, finish=c.finish_reason)
            if body.include_usage:
                use = shapes.result_usage([result])
                yield shapes.chunk(rid, served.name, chat=chat, use=use)
            _record(server, served, [result], time.perf_counter() - started)
            yield shapes.DONE
        finally:
            release()

    return StreamingResponse(events(), media_type="text/event-stream")
