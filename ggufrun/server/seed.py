"""The seed's API and page: ``POST /`` (the FastAPI demo ggufrun grew from: ``{"prompt"}`` ->
``{"response", "status", "time"}``, with its system prompt) and ``GET /``, the chat page (which
talks to the OpenAI API from the browser)."""

from __future__ import annotations

import datetime
import logging
from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..reasoning import split
from ..templates import chat_tokens
from . import protocol as P
from . import thinking
from .api_errors import invalid
from .core import Server
from .engine import Backend
from .request import read_json, safe
from .streaming import collect

log = logging.getLogger("ggufrun.server")

SEED_SYSTEM_PROMPT = "You are a helpful assistant."  # what the seed's FastAPI demo sends before the prompt
SEED_MAX_TOKENS = 512  # the seed demo's max_new_tokens


def routes(server: Server) -> list[Route]:
    limit = server.config.max_body_bytes

    async def seed_demo(request: Request) -> Response:
        """The seed's FastAPI demo: {"prompt"} -> {"response", "status", "time"}, with its system prompt."""
        body = await read_json(request, limit)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise invalid("prompt", "expected a string.")
        rest = {k: v for k, v in body.items() if k != "prompt"}
        P.check_fields(rest, {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "repeat_penalty", "stop"},
                       {}, "POST /")
        params = P.parse_gen(rest, chat=True)
        messages = [{"role": "system", "content": SEED_SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        cfg = server.lookup(params.model)

        def build(backend: Backend) -> list[list[int]]:
            params.stop = [*params.stop, *backend.template.stop]
            params.max_tokens = params.max_tokens or backend.settings.max_tokens or SEED_MAX_TOKENS
            variables = thinking.template_variables(params, backend.reasoning, backend.settings, cfg.id,
                                                     backend.template.jinja_source)
            tokens = chat_tokens(backend.template, backend.model, messages, variables=variables)
            return [thinking.plan(params, backend.reasoning, backend.settings, backend.model, tokens)]

        group = await server.submit(params, cfg, build)
        results = await collect(request, group)
        if results is None:
            return Response(status_code=499)
        text = results[0].text
        if params.think is not None:  # a reasoning model's: the seed's one field holds the answer, as chat's window does
            text = split(text, params.think.fmt, params.think.start)[1]
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        log.info('[%s] prompt:"%s", response:"%s"', now, safe(prompt), safe(text))
        return JSONResponse({"response": text, "status": 200, "time": now})

    async def page(request: Request) -> Response:
        html = resources.files("ggufrun.server").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    return [Route("/", page, methods=["GET"]), Route("/", seed_demo, methods=["POST"])]
