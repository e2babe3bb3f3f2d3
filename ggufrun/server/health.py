"""The operator's routes, outside every API: ``GET /health`` (200 when ready, 503 while a model
loads or after an engine died) and ``GET /metrics`` (Prometheus text, metrics.py)."""

from __future__ import annotations

from pathlib import PurePath

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .core import Server


def routes(server: Server) -> list[Route]:
    async def health(request: Request) -> Response:
        status = server.pool.status()
        # model ids only: a served id is never a path (ModelConfig.id), and /health needs no key
        models = {PurePath(name).name: state for name, state in server.pool.loaded().items()}
        return JSONResponse({"status": status, "models": models}, status_code=200 if status == "ready" else 503)

    async def metrics_text(request: Request) -> Response:
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    return [Route("/health", health, methods=["GET"]), Route("/metrics", metrics_text, methods=["GET"])]
