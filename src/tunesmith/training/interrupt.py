"""Graceful interruption: the first SIGINT/SIGTERM asks the loop to stop, the second kills.

A job scheduler's SIGTERM or a user's Ctrl-C should not throw away hours of
training. The first signal only sets a flag; the loop finishes the current
optimizer step, writes a resumable checkpoint and raises ``TrainingInterrupted``.
A second signal restores the default handler and re-sends itself, so the
process dies at once (for when the step or the checkpoint itself hangs).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulInterrupt:
    """Context manager that turns the first SIGINT/SIGTERM into a flag.

    Handlers are only installed from the main thread (Python allows no
    other); elsewhere the context is inert and ``requested`` stays None.
    The previous handlers are restored on exit.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def signal_name(self) -> str:
        """Name of the signal received (``SIGTERM``), or an empty string."""
        return signal.Signals(self.requested).name if self.requested else ""

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested is not None:  # second signal: die the default way, now
            self.restore()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = signum
        log.warning(
            "%s received: finishing this step and writing a resumable checkpoint "
            "(send it again to abort at once)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put the handlers back as they were before ``__enter__``."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()
