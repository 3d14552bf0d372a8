"""The HTTP side of ``tunesmith serve``: OpenAI-compatible routes over the scheduler.

Routes (``routes.py``): ``/v1/chat/completions``, ``/v1/completions`` (streamed
as server-sent events on request), ``/v1/classify`` (classifiers and taggers),
``/v1/models``, ``/health``, ``/metrics`` and the admin routes ``POST
/admin/models`` and ``DELETE /admin/models/{id}`` that load and unload models
while serving.

Guards, in the order a request meets them: the API key (401; compared in
constant time; ``/health`` is open), the body size (413), the number of
requests in flight (429), JSON and parameter checks (400, naming the
parameter), the model id (404). Every error is OpenAI's error object; an
unexpected failure is logged and answered 500 without a traceback.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.serve.catalog import Catalog
from tunesmith.serve.routes import router
from tunesmith.serve.schemas import ApiError
from tunesmith.serve.server import Server, ServeSettings, server_of

log = logging.getLogger(__name__)

#: Paths answered without the API key.
_OPEN = {"/health"}
#: Paths whose requests become scheduler jobs.
_MODEL_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/classify"}


def create_app(catalog: Catalog, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``catalog`` under ``settings``."""
    app = FastAPI(title="tunesmith", lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.server = Server(catalog, settings or ServeSettings())
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
    app.middleware("http")(_guard)
    app.include_router(router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.server.scheduler.start()
    yield
    app.state.server.scheduler.stop()


async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    body = ApiError(err.status_code, str(err.detail), kind=kind).body()
    return JSONResponse(body, status_code=err.status_code)


async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    log.exception("request %s failed", request.url.path)
    body = ApiError(500, "internal error (see the server log)", kind="server_error").body()
    return JSONResponse(body, status_code=500)


async def _guard(request: Request, call_next: Any) -> Any:
    """Key and declared size first; a model request is announced to the scheduler.

    The announcement lasts while the body is read and checked, so that a
    round about to start waits for it (and only then waits).
    """
    server = server_of(request)
    error = _refusal(request, server.settings)
    response = JSONResponse(error.body(), status_code=error.status) if error else None
    if response is None:
        request.state.arriving = request.url.path in _MODEL_ROUTES
        if request.state.arriving:
            server.scheduler.arrive()
        try:
            response = await call_next(request)
        except Exception as err:  # pragma: no cover - the handlers above answer first
            response = await _unexpected(request, err)
        finally:
            if request.state.arriving:  # refused before it was submitted
                server.scheduler.arrive(-1)
    server.metrics.response(response.status_code)
    return response


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
