"""A running ``ggufrun serve``, seen from outside over HTTP: which models it has loaded and unloading
one, through the Ollama routes ``ollama ps`` and ``ollama stop`` use (``GET /api/ps``;
``POST /api/generate`` with no prompt and ``keep_alive: 0``). For ``ggufrun ps`` and ``ggufrun stop``.
"""

from __future__ import annotations

import datetime
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from .errors import ExitStatus, GgufrunError, UnknownModelError

DEFAULT_PORT = 13003  # serve's (server/models.py); here too, so that `ps --help` imports no server
UNLOAD_WAIT = 10.0  # seconds `stop` waits for an idle model to leave /api/ps


class ServerUnreachableError(GgufrunError):
    """No ggufrun server answers at the address given."""


class NotRunningError(GgufrunError):
    """The server has not loaded the model named."""

    exit_status = ExitStatus.NOT_FOUND


@dataclass(frozen=True)
class Endpoint:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None

    @property
    def url(self) -> str:
        # a server bound to every interface is reached on the loopback one
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        """The decoded JSON reply; GgufrunError with the server's own message on an error status."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return json.loads(reply.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error")
            except (ValueError, AttributeError):
                message = None
            if exc.code == 404:
                raise UnknownModelError(f"{message or exc.reason} ({self.url}).") from None
            raise GgufrunError(f"{self.url}{path} answered {exc.code}: {message or exc.reason}.",
                               "Pass --api-key (or set GGUFRUN_API_KEY)." if exc.code == 401 else None) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerUnreachableError(f"No ggufrun server answers at {self.url} ({reason}).",
                                         "Start one with `ggufrun serve`, or pass its --host and --port.") from None


def running(endpoint: Endpoint) -> list[dict[str, Any]]:
    """The loaded models, as /api/ps lists them."""
    reply = endpoint.call("GET", "/api/ps")
    models = reply.get("models") if isinstance(reply, dict) else None
    if not isinstance(models, list):
        raise GgufrunError(f"{endpoint.url}/api/ps did not answer a model list; is this a ggufrun server?")
    return [m for m in models if isinstance(m, dict)]


def _same(name: str, entry: dict[str, Any]) -> bool:
    wanted = name[: -len(":latest")] if name.endswith(":latest") else name
    return wanted in (entry.get("name"), entry.get("model"))


def stop(endpoint: Endpoint, model: str) -> bool:
    """Unload ``model``: True once it is gone, False when it is still in use after UNLOAD_WAIT
    seconds (it unloads when its requests end). Raises NotRunningError when it is not loaded."""
    if not any(_same(model, m) for m in running(endpoint)):
        raise NotRunningError(f"Model '{model}' is not running on {endpoint.url}.", "See `ggufrun ps`.")
    endpoint.call("POST", "/api/generate", {"model": model, "keep_alive": 0, "stream": False})
    deadline = time.monotonic() + UNLOAD_WAIT
    while any(_same(model, m) for m in running(endpoint)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def processor(entry: dict[str, Any]) -> str:
    """Where a model's memory is, as `ollama ps` says it: "100% CPU", "100% GPU", "48%/52% CPU/GPU"."""
    size, vram = int(entry.get("size") or 0), int(entry.get("size_vram") or 0)
    if size <= 0 or vram <= 0:
        return "100% CPU"
    if vram >= size:
        return "100% GPU"
    gpu = round(100 * vram / size)
    return f"{100 - gpu}%/{gpu}% CPU/GPU"


def until(entry: dict[str, Any], now: datetime.datetime | None = None) -> str:
    """When an idle model unloads, in words: "4 minutes from now", "Forever", "Stopping...". """
    text = entry.get("expires_at")
    try:
        when = datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return "?"
    if when.tzinfo is None:  # a time without an offset is UTC (else a TypeError below)
        when = when.replace(tzinfo=datetime.timezone.utc)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    left = (when - now).total_seconds()
    if left > 100 * 365 * 86400:
        return "Forever"
    if left < 1:
        return "Stopping..."
    for unit, seconds in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if left >= seconds:
            n = int(left // seconds)
            return f"{n} {unit}{'s' if n != 1 else ''} from now"
    return "Stopping..."
