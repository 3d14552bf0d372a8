"""The error family users see.

Every failure caused by user input (config, data, paths, models) is a
``TunesmithError``. The CLI catches the family once, prints ``str(err)`` as a
single line (a config with several problems: a line each, all at once) and
exits with ``err.exit_code``; anything else is a bug and keeps its traceback.
Messages say what is wrong, where (file, line, key) and how to fix it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class TunesmithError(Exception):
    """Base of every error caused by user input; one clear line for the CLI."""

    exit_code: int = EXIT_USER_ERROR


class ConfigError(TunesmithError):
    """The configuration file or an override is invalid."""


class DataError(TunesmithError):
    """A data file is missing, malformed or inconsistent with the config."""


class ModelError(TunesmithError):
    """A model or checkpoint path cannot be used."""


class AssetError(TunesmithError):
    """An offline demo asset (model or data package) is not installed."""


class GenerationError(TunesmithError):
    """A generation request cannot be served (bad sampling settings, prompt too long).

    Its own class so a server can answer it as the client's mistake, not its own.
    """


class TrainingDiverged(TunesmithError):
    """Loss or gradients stayed non-finite for several steps and the run was stopped.

    Exit code 2 like other input problems: the usual cause is a learning rate
    or data the user controls.
    """


class CheckpointError(TunesmithError):
    """A checkpoint cannot be written (disk space) or resumed from (missing, incompatible)."""


class TrainingInterrupted(TunesmithError):
    """SIGINT/SIGTERM stopped the run after a resumable checkpoint was written.

    The exit code is the shell's convention for death by that signal
    (128 + signal number: 130 for SIGINT, 143 for SIGTERM), so job schedulers
    see an interruption, not a failure of the input.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
