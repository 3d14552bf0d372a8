"""The ``tunesmith`` command line: parse, call the Python API, format the output.

Each command module (run, inspect, config, assets, library, data, deploy,
studies) holds its own Typer app; this one adds them all to the root app.
Errors caused by input (``TunesmithError``) are caught once, here, and printed
as one line on stderr with exit code 2 (3 for a diverged run); ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import click
import typer

from tunesmith.cli import (
    assets,
    config,
    data,
    deploy,
    inspect,
    launch,
    library,
    run,
    serve,
    studies,
)
from tunesmith.errors import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    TrainingInterrupted,
    TunesmithError,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="tunesmith: fine-tune pretrained transformers, one coherent controller.",
)
for _module in (run, launch, inspect, studies, deploy, serve, data, config, library, assets):
    app.add_typer(_module.app)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _setup_logging(logging.WARNING if quiet else logging.INFO)


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear through an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class _OntoStderr(logging.Filter):
    """Send a library logger's warnings to stderr instead of its own stdout handler.

    deepspeed logs to stdout (it attaches the handler when it is imported, and
    accelerate imports it in every run once it is installed): its lines would
    corrupt what commands print there (``estimate --json``, ``predict``). A
    filter on the logger survives that handler being attached later.
    """

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            self.handler.handle(record)
        return False  # never through the library's own (stdout) handler


def _setup_logging(level: int) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("tunesmith")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    deepspeed = _TqdmHandler()
    deepspeed.setFormatter(logging.Formatter("deepspeed: %(message)s"))
    logging.getLogger("DeepSpeed").filters[:] = [_OntoStderr(deepspeed)]


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turn user errors into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        result = app(args=args, prog_name="tunesmith", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except TunesmithError as err:
        if debug:
            raise
        kind = "interrupted" if isinstance(err, TrainingInterrupted) else "error"
        print(f"{kind}: {err}", file=sys.stderr)
        return err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
    except click.ClickException as err:
        err.show()
        return EXIT_USER_ERROR if err.exit_code == 2 else err.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
