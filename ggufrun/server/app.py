"""The ASGI app: the API modules' routes and the middleware around them, assembled, nothing else.

Which module answers what (see the package docstring for a request's way through them):
openai.py ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/models``;
responses.py ``/v1/responses``; anthropic.py ``/v1/messages``; ollama.py ``/api/*``; llamacpp.py
llama-server's own (``/tokenize``, ``/completion``, ``/infill``, ``/props``, ``/slots``, ``/rerank``...);
router.py ``/models``, ``/models/load``, ``/models/unload``; seed.py ``POST /`` and the chat page;
health.py ``/health`` and ``/metrics``. Every error a route's own API did not render is JSON in
the shape of the API its path belongs to (:func:`error_shape`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from ..errors import GgufrunError
from . import anthropic, health, llamacpp, ollama, openai, responses, router, security, seed
from .api_errors import ApiError
from .core import SHUTDOWN_GRACE, Server
from .metrics import Metrics
from .middleware import AccessLog, BearerAuth, error_handler
from .models import ServeConfig


def error_shape(path: str, error: ApiError) -> dict[str, Any]:
    """``error``'s body in the shape the clients of ``path``'s API read (Anthropic's under
    /v1/messages, Ollama's under /api/, else OpenAI's): for the errors no route handler answers
    (a wrong key, an unknown route or method)."""
    if path.startswith("/v1/messages"):
        return anthropic.error_body(error.status, error.message)
    if path.startswith("/api/"):
        return {"error": error.message}
    return error.body()


def create_app(config: ServeConfig, *, registry: Any = None, preload: bool = False) -> Starlette:
    """The ASGI app for ``config``. ``preload`` starts loading the first model at start-up
    (``ggufrun serve NAME``); otherwise each model loads on its first request."""
    if registry is None:
        from .. import registry as registry_mod

        registry = registry_mod.load(config.models_file)
    metrics = Metrics()
    server = Server(config, registry, metrics)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server.loop = asyncio.get_running_loop()
        if preload:
            engine = server.pool.preload(config.models[0])
            engine.loaded.add_done_callback(lambda f: server.loop.call_soon_threadsafe(preload_done, f))  # type: ignore[union-attr]
        yield
        await server.pool.shutdown(SHUTDOWN_GRACE)

    def preload_done(future: Any) -> None:
        error = future.exception()
        if error is not None and server.stop_server is not None:
            server.fatal = error if isinstance(error, GgufrunError) else GgufrunError(str(error))
            server.stop_server()

    routes = [*seed.routes(server), *health.routes(server), *openai.routes(server), *anthropic.routes(server),
              *ollama.routes(server), *responses.routes(server), *llamacpp.routes(server), *router.routes(server)]
    middleware = [Middleware(AccessLog, metrics=metrics, routes={r.path for r in routes})]
    middleware += security.middleware(config, error_shape)  # Host allow-list, cross-site POSTs, auth scheme
    if config.cors:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(config.cors), allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["*"]))  # the SDKs add x-stainless-*, anthropic-*, openai-*
    if config.api_key:
        middleware.append(Middleware(BearerAuth, api_key=config.api_key, shape=error_shape))
    on_error = error_handler(error_shape)
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={ApiError: on_error, GgufrunError: on_error, HTTPException: on_error,
                                        ClientDisconnect: on_error, Exception: on_error})
    app.state.server = server
    return app
