"""ggufrun serve: OpenAI, Responses, Anthropic, Ollama and llama-server APIs over one batching engine.

:func:`run` starts uvicorn in-process on the app from :func:`ggufrun.server.app.create_app`.
This package imports Starlette and uvicorn only when used, so ``ggufrun --help`` stays fast.

How the package is laid out, top-down (a module imports only those below it; tests/test_layering.py
fails on an import circle, or on one API module importing another)::

    app.py          assembles routes and middleware (middleware.py: access log, API key, errors)
      API modules   one per API, none imports another:
                    openai.py (chat, completions, embeddings, models), responses.py, anthropic.py,
                    ollama.py, llamacpp.py (tokenize, detokenize, apply-template), seed.py (POST /
                    and the chat page); health.py (/health, /metrics) is the operator's
    translate.py    what the translating APIs share: ChatRun, field refusal, error boundary, SSE/NDJSON
    core.py         Server: served models (models.py), engines, prompt building and prefill, the
                    one generation pipeline (start_chat, submit), embeddings; knows no API
    replies.py      the engine's events as OpenAI reply objects, whole or as chunks
    protocol.py     request bodies checked (constraints.py: grammars; tools.py: tool calls)
    request.py, api_errors.py, streaming.py   reading a body; ApiError; a job group's events
    engine.py       continuous batching on one model, on its own thread

A request's way, e.g. ``POST /v1/messages`` (Anthropic): anthropic.py checks the body and
translates it into an OpenAI chat body -> translate.start_chat -> core.Server.start_chat checks
it (protocol.py), looks the model up and acquires its engine (models.ModelPool loads it on first
use), renders the prompt with the GGUF's template (off the event loop) and submits one engine.Job
per choice -> the engine thread batches it with the other running jobs and posts text/done/error
events to the job's queue -> replies.Choices turns those events into OpenAI chunks (or one whole
``chat.completion``) -> anthropic.py dresses them as Anthropic's events or message, and
streaming.EventStream sends them, cancelling the jobs if the client goes away. The OpenAI API
sends replies.py's objects as they are. An error raised anywhere is rendered at the API's own
boundary (translate.guarded, or the app's handler in the path's API's shape).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from typing import Any

from ..errors import GgufrunError

from .models import ServeConfig

# uvicorn waits this long for open responses after SIGTERM before cancelling them; the engines
# then stop at their next step, so the process is gone well within 10 seconds.
GRACEFUL_SECONDS = 5


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def switch_interval() -> float:
    """The GIL switch interval serve runs with, in seconds: GGUFRUN_SWITCH_INTERVAL_MS (for
    measuring it, bench/serve_load.py) or 1 ms."""
    import os

    from ..errors import ConfigError

    raw = os.environ.get("GGUFRUN_SWITCH_INTERVAL_MS", "1")
    try:
        ms = float(raw)
    except ValueError:
        ms = -1.0
    if not 0.01 <= ms <= 100:
        raise ConfigError(f"GGUFRUN_SWITCH_INTERVAL_MS={raw!r} is not a number of milliseconds from 0.01 to 100.")
    return ms / 1000


def run(config: ServeConfig, *, preload: bool = False) -> None:
    """Serve ``config`` until SIGINT/SIGTERM. ``preload`` loads the first model at start-up and
    stops the server (re-raising the error) when it cannot load. Raises UnknownModelError and
    ConfigError before listening."""
    import uvicorn

    from .app import create_app
    from .guard import KEEP_ALIVE_SECONDS, BodyGuard, guarded_protocol, raise_fd_limit

    # Read before the bind: a bad value is refused without a listening socket left behind (the
    # tests refuse it through the real entry point in their own process).
    interval = switch_interval()
    # Bind before anything slow: a port in use or a host that does not resolve fails in a moment,
    # with ggufrun's one-line error, not after the model has loaded.
    sock = bind(config.host, config.port)
    raise_fd_limit()
    # The engine thread is the critical path of every step, and it needs the GIL back after each
    # llama.cpp and numpy call; while the HTTP thread runs Python it waits up to the switch interval
    # (5 ms by default). At 1 ms, 64 sampled streams on an H100 went 2,196 -> 2,344 tok/s (greedy
    # 2,678 -> 2,763; bench/serve_load.py, same warm machine).
    sys.setswitchinterval(interval)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("ggufrun.server")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    app = create_app(config, preload=preload)
    app_server = app.state.server
    for line in address_lines(sock.getsockname()):
        logger.info("%s", line)

    class Server(uvicorn.Server):
        """uvicorn's server, which also tells the engines to wind down when SIGTERM/SIGINT arrives."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            app_server.begin_shutdown()
            super().handle_exit(sig, frame)

    uv_config = uvicorn.Config(BodyGuard(app), host=config.host, port=config.port, log_level="info", access_log=False,
                               lifespan="on", timeout_graceful_shutdown=GRACEFUL_SECONDS, http=guarded_protocol(),
                               timeout_keep_alive=KEEP_ALIVE_SECONDS)
    uv_server = Server(uv_config)
    app_server.stop_server = lambda: setattr(uv_server, "should_exit", True)
    try:
        uv_server.run(sockets=[sock])
    finally:
        sock.close()
    if app_server.fatal is not None:  # `ggufrun serve NAME` whose model cannot load: exit non-zero, one line
        raise app_server.fatal


def address_lines(address: tuple[Any, ...]) -> list[str]:
    """The start-up lines that say where the server listens (the port the OS chose for --port 0)
    and where the chat page is, at an address a browser on this machine can open."""
    host, port = str(address[0]), int(address[1])
    ipv6 = ":" in host
    shown = f"[{host}]" if ipv6 else host
    browsable = ("[::1]" if ipv6 else "127.0.0.1") if host in ("0.0.0.0", "::") else shown
    return [f"Listening on http://{shown}:{port} (OpenAI /v1, Anthropic /v1/messages, Ollama /api)",
            f"Chat page: http://{browsable}:{port}/"]


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port``; GgufrunError (one line) when the host does not
    resolve or the address cannot be bound."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise GgufrunError(f"Cannot listen on {host}:{port}: the host does not resolve ({exc}).",
                           "Use an address such as 127.0.0.1 or 0.0.0.0 for --host.") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise GgufrunError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}.",
                           "Is another server using that port? Choose another --port.") from None
    # Never inherited: a child that outlives the server (llama.cpp's abort handler once started gdb,
    # which kept the port after shutdown) must not hold the listening socket.
    sock.set_inheritable(False)
    return sock


__all__ = ["ServeConfig", "bind", "is_loopback", "run"]
