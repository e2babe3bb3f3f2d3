"""Typed errors raised by the core; the CLI's error boundary turns them into one line each.

Every error a user or a client can cause is a subclass of :class:`GgufrunError`. Its message
says what failed and with which value; ``hint`` says what to do next.
"""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    """Process exit codes, named so that scripts can rely on them."""

    OK = 0
    ERROR = 1
    USAGE = 2
    NOT_FOUND = 3
    INTERRUPTED = 130


class GgufrunError(Exception):
    """Base of every error the core raises on bad input or a failed operation."""

    exit_status: ExitStatus = ExitStatus.ERROR
    http_status: int = 400

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"


class ConfigError(GgufrunError):
    """A settings value, config.toml or models.toml is invalid."""

    exit_status = ExitStatus.USAGE
    http_status = 422


class UnknownModelError(GgufrunError):
    """A model name resolves to nothing in the registry."""

    exit_status = ExitStatus.USAGE
    http_status = 404


class UnknownQuantError(GgufrunError):
    """The registry entry has no file for the requested quantisation."""

    exit_status = ExitStatus.USAGE
    http_status = 404


class NotCachedError(GgufrunError):
    """The model file is not in the local cache (and fetching is not allowed)."""

    exit_status = ExitStatus.NOT_FOUND
    http_status = 404


class DownloadError(GgufrunError):
    """Every source failed to deliver a file."""


class IntegrityError(DownloadError):
    """A downloaded file's size or sha256 does not match what the hub or registry says."""


class DiskSpaceError(DownloadError):
    """Not enough free disk space for a download."""


class InvalidGGUFError(GgufrunError):
    """A file is not a GGUF file, or is truncated or corrupt."""


class ModelLoadError(GgufrunError):
    """llama.cpp refused to load a model file, or failed while running it (a server-side failure)."""

    http_status = 500


class ModelClosedError(GgufrunError):
    """The model was unloaded (its engine stopped or failed) while a request was about to use it."""

    http_status = 503


class ContextOverflowError(GgufrunError):
    """A prompt or message does not fit in the context window."""

    def __init__(self, message: str, hint: str | None = None, *, n_tokens: int = 0, n_ctx: int = 0) -> None:
        super().__init__(message, hint)
        self.n_tokens = n_tokens
        self.n_ctx = n_ctx


class TemplateError(GgufrunError):
    """A chat template is unknown or fails to render."""


class BenchError(GgufrunError):
    """A benchmark configuration cannot run."""


class BenchUsageError(BenchError):
    """A bench request that cannot run as given (a bad flag value or combination): nothing was measured."""

    exit_status = ExitStatus.USAGE


class GrammarError(GgufrunError):
    """llama.cpp rejected a request's grammar (GBNF)."""

    http_status = 400


class RpcError(GgufrunError):
    """An RPC worker cannot be reached or started, or llama.cpp was built without RPC."""

    http_status = 503
