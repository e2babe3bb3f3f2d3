"""ggufrun serve: an OpenAI-compatible HTTP server with continuous batching (see engine.py).

:func:`run` starts uvicorn in-process on the app from :func:`ggufrun.server.app.create_app`.
This package imports Starlette and uvicorn only when used, so ``ggufrun --help`` stays fast.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from typing import Any

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


def run(config: ServeConfig, *, preload: bool = False) -> None:
    """Serve ``config`` until SIGINT/SIGTERM. ``preload`` loads the first model at start-up and
    stops the server (re-raising the error) when it cannot load. Raises UnknownModelError and
    ConfigError before listening."""
    import uvicorn

    from .app import create_app

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("ggufrun.server")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    app = create_app(config, preload=preload)
    app_server = app.state.server

    class Server(uvicorn.Server):
        """uvicorn's server, which also tells the engines to wind down when SIGTERM/SIGINT arrives."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            app_server.begin_shutdown()
            super().handle_exit(sig, frame)

    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level="info", access_log=False,
                               lifespan="on", timeout_graceful_shutdown=GRACEFUL_SECONDS)
    uv_server = Server(uv_config)
    app_server.stop_server = lambda: setattr(uv_server, "should_exit", True)
    uv_server.run()
    if app_server.fatal is not None:  # `ggufrun serve NAME` whose model cannot load: exit non-zero, one line
        raise app_server.fatal


__all__ = ["ServeConfig", "is_loopback", "run"]
