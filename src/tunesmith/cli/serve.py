"""``tunesmith serve``: an OpenAI-compatible HTTP server for trained checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from tunesmith.cli.common import TrustRemoteCode
from tunesmith.errors import ConfigError

app = typer.Typer()


@app.command("serve")
def serve(
    checkpoints: Annotated[
        list[str] | None,
        typer.Argument(help="Checkpoint folders to serve: PATH or NAME=PATH (the model id)."),
    ] = None,
    library: Annotated[
        Path | None,
        typer.Option(
            "--library",
            help="Serve every checkpoint of this adapter library; the admin route loads "
            "from it only.",
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on (loopback by default).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="TUNESMITH_API_KEY",
            help="Require 'Authorization: Bearer KEY' (also enables the admin routes).",
        ),
    ] = None,
    max_batch: Annotated[
        int, typer.Option(min=1, help="Rows (completions) per batch; 1 turns batching off.")
    ] = 32,
    max_wait_ms: Annotated[
        float, typer.Option(min=0, help="How long a request waits for others to batch with.")
    ] = 10.0,
    max_tokens: Annotated[int, typer.Option(min=1, help="Largest max_tokens accepted.")] = 1024,
    max_concurrent: Annotated[int, typer.Option(min=1, help="Requests in flight before 429.")] = 64,
    max_body_bytes: Annotated[
        int, typer.Option(min=1024, help="Largest request body (413 beyond).")
    ] = 1_000_000,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Serve checkpoints over HTTP: /v1/chat/completions, /v1/completions, /v1/classify."""
    try:
        import uvicorn

        from tunesmith.serve.app import ServeSettings, create_app
    except ImportError as err:
        raise ConfigError(
            f"tunesmith serve needs FastAPI and uvicorn ({err.name} is missing): "
            "pip install 'tunesmith[serve]'"
        ) from None
    from tunesmith.serve.launch import build_catalog

    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        typer.echo(f"warning: serving on {host} without --api-key", err=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    catalog = build_catalog(list(checkpoints or []), library, trust_remote_code=trust_remote_code)
    settings = ServeSettings(
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        max_tokens=max_tokens,
        max_concurrent=max_concurrent,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
    )
    typer.echo(f"serving {', '.join(catalog.names())} on http://{host}:{port}/v1", err=True)
    uvicorn.run(create_app(catalog, settings), host=host, port=port, log_level="warning")
