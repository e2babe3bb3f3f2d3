"""llama-server's router routes: ``GET /models`` (the served models, each with ``status.value``
loaded, loading or unloaded), and loading and unloading a model by hand: ``POST /models/load`` and
``POST /models/unload`` with ``{"model": NAME}``, answering ``{"success": true}`` (errors in the
OpenAI shape, as llama-server's). A loaded model then stays for the server's --keep-alive, as one
a request loaded; unloading waits for nothing: a model in use unloads when its requests end
(lifecycle.py), and the reply says so.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .api_errors import ApiError
from .core import Server
from .request import read_json


def _model(body: object) -> str:
    if not isinstance(body, dict) or set(body) - {"model"} or not isinstance(body.get("model"), str) or not body["model"]:
        raise ApiError(400, "The body must be {\"model\": NAME}.", param="model")
    return str(body["model"])


def routes(server: Server) -> list[Route]:
    async def models(request: Request) -> Response:
        states = {"ready": "loaded", "loading": "loading"}
        loaded = server.pool.loaded()
        data = [{"id": cfg.id, "object": "model", "owned_by": "ggufrun", "created": server.started,
                 "status": {"value": states.get(loaded.get(cfg.id, ""), "unloaded")}} for cfg in server.config.models]
        return JSONResponse({"object": "list", "data": data})

    async def load(request: Request) -> Response:
        cfg = server.lookup(_model(await read_json(request, server.config.max_body_bytes)))
        server.pool.release(await server.acquire(cfg))
        return JSONResponse({"success": True})

    async def unload(request: Request) -> Response:
        cfg = server.lookup(_model(await read_json(request, server.config.max_body_bytes)))
        done = server.pool.unload(cfg.id)
        if done is None:
            raise ApiError(400, f"Model '{cfg.id}' is not loaded.", param="model")
        return JSONResponse({"success": True, **({} if done else {"pending": "in use: it unloads when its requests end"})})

    return [Route("/models", models, methods=["GET"]), Route("/models/load", load, methods=["POST"]),
            Route("/models/unload", unload, methods=["POST"])]
