"""Errors a user can cause, and nothing else.

Every failure that a person can fix by changing a config, a file or a command
line is raised as a :class:`TunelabError` subclass carrying a message that says
*what to change*.  The CLI maps these to a non-zero exit code and a one-paragraph
message (no traceback); the API maps them to HTTP statuses.  Anything else that
escapes is a bug in tunelab and is allowed to show a traceback.
"""

from __future__ import annotations


class TunelabError(Exception):
    """Base class for errors caused by user input; ``exit_code`` is what the CLI returns."""

    exit_code = 1
    http_status = 400

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class ConfigError(TunelabError):
    """A config key is unknown, missing or holds a value out of range."""

    exit_code = 2
    http_status = 422


class DataError(TunelabError):
    """A dataset file is missing, empty, malformed or holds invalid records."""

    exit_code = 3
    http_status = 422

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        hint: str | None = None,
    ) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message, hint=hint)
        self.path = path
        self.line = line


class ModelError(TunelabError):
    """A model or tokenizer can't be found or loaded from the given path or hub id."""

    exit_code = 4


class BackendError(TunelabError):
    """The requested backend or device cannot serve this config on this machine."""

    exit_code = 5


class NotFoundError(TunelabError):
    """A run, job, checkpoint or artifact named by the user does not exist."""

    exit_code = 6
    http_status = 404


class StateError(TunelabError):
    """The request conflicts with the current state (e.g. resuming a completed run)."""

    exit_code = 7
    http_status = 409


class TooLargeError(TunelabError):
    """An upload or request body is bigger than the configured limit."""

    exit_code = 3
    http_status = 413


class StorageError(TunelabError):
    """Storage that can't take what tunelab writes: a full disk (what, where, how much it needs), a home folder
    that can't be created, or a registry database that can't be reached."""

    exit_code = 8
    http_status = 507


class DivergedError(TunelabError):
    """Training produced a non-finite loss or gradient (NaN or inf); the run stops before saving such weights."""

    exit_code = 9
    http_status = 422
