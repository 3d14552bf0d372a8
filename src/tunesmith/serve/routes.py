"""The routes of ``tunesmith serve``: OpenAI's completions, classification, models, admin.

Handlers are module-level functions that find their ``Server`` on the
application (``server_of``): closures over it would be kept alive by
FastAPI's caches after the application is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from tunesmith.errors import TunesmithError
from tunesmith.models.completions import GenerationResult, encode_prompt
from tunesmith.serve import responses as shapes
from tunesmith.serve.catalog import Served
from tunesmith.serve.metrics import prometheus
from tunesmith.serve.scheduler import CallJob, ClassifyJob, GenerateJob
from tunesmith.serve.schemas import (
    ApiError,
    ChatBody,
    ClassifyBody,
    CompletionBody,
    LoadBody,
    SamplingBody,
)
from tunesmith.serve.server import (
    Server,
    chat_prompt,
    generation_request,
    parse,
    server_of,
)

log = logging.getLogger(__name__)
router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    return {"status": "ok", "models": server_of(request).catalog.names()}


@router.get("/metrics")
async def metrics(request: Request, format: str = "json") -> Any:
    server = server_of(request)
    snap = server.metrics.snapshot(server.scheduler.queued, server.in_flight)
    return PlainTextResponse(prometheus(snap)) if format == "prometheus" else snap


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    catalog = server_of(request).catalog
    return {"object": "list", "data": [_model_card(catalog.get(n)) for n in catalog.names()]}


@router.post("/v1/chat/completions")
async def chat(request: Request) -> Any:
    server = server_of(request)
    body: ChatBody = await parse(request, ChatBody, server.settings.max_body_bytes)
    served = server.model(body.model, generative=True)
    prompt = chat_prompt(served, body)
    return await _complete(server, request, served, body, body.token_budget, [prompt], chat=True)


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    server = server_of(request)
    body: CompletionBody = await parse(request, CompletionBody, server.settings.max_body_bytes)
    served = server.model(body.model, generative=True)
    if not 1 <= len(body.prompts) <= server.settings.max_inputs:
        raise ApiError(400, f"prompt: 1 to {server.settings.max_inputs} prompts", param="prompt")
    if body.stream and len(body.prompts) > 1:
        raise ApiError(400, "prompt: stream one prompt at a time", param="prompt")
    prompts = [encode_prompt(served.tokenizer, p) for p in body.prompts]
    return await _complete(server, request, served, body, body.token_budget, prompts, chat=False)


@router.post("/v1/classify")
async def classify(request: Request) -> Any:
    server = server_of(request)
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
        {"index": i, **{k: v for k, v in row.items() if k != "text"}} for i, row in enumerate(rows)
    ]
    return {
        "object": "list",
        "model": served.name,
        "data": data,
        "usage": {"prompt_tokens": sum(lengths), "total_tokens": sum(lengths)},
    }


@router.post("/admin/models")
async def load(request: Request) -> Any:
    server = server_of(request)
    _admin_allowed(server)
    body: LoadBody = await parse(request, LoadBody, server.settings.max_body_bytes)
    catalog = server.catalog
    if body.model in catalog.served:
        raise ApiError(409, f"model '{body.model}' is already served", param="model")
    job = CallJob(lambda: catalog.add_from_library(body.model, body.path))
    served = await server.run(job, request)
    server.metrics.track(served.name, served.manifest.get("data_profile"))
    return _model_card(served)


@router.delete("/admin/models/{name}")
async def unload(name: str, request: Request) -> Any:
    server = server_of(request)
    _admin_allowed(server)
    catalog = server.catalog
    if name not in catalog.served:
        message = f"model '{name}' is not served"
        raise ApiError(404, message, param="model", code="model_not_found")
    await server.run(CallJob(lambda: catalog.remove(name)), request)
    return {"id": name, "object": "model", "deleted": True}


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
