"""OpenAI's API: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` and ``/v1/models``.

Each handler checks the body (protocol.py), hands the core one build of prompt tokens per choice
(core.Server.submit, or start_chat for chat) and sends the replies.py objects as they are,
streamed as server-sent events or whole. Errors are OpenAI's shape, rendered by the app's
exception handlers (api_errors.ApiError.body).
"""

from __future__ import annotations

import base64
import struct

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import fim, limits
from . import protocol as P
from .api_errors import invalid
from .core import Server
from .engine import Backend
from .protocol import GenParams
from .replies import Choices
from .request import read_json
from .streaming import EventStream, JobGroup, collect


def routes(server: Server) -> list[Route]:
    limit = server.config.max_body_bytes

    async def respond(request: Request, group: JobGroup, params: GenParams, choices: Choices) -> Response:
        if params.stream:
            return EventStream(group, choices.sse(group))  # type: ignore[return-value]
        results = await collect(request, group)
        if results is None:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return JSONResponse(choices.whole(results))

    async def chat_completions(request: Request) -> Response:
        body = await read_json(request, limit)
        group, params, choices = await server.start_chat(body)
        return await respond(request, group, params, choices)

    async def completions(request: Request) -> Response:
        body = await read_json(request, limit)
        P.check_fields(body, P.COMPLETION_FIELDS, P.COMPLETION_REFUSED, "/v1/completions")
        params = P.parse_gen(body, chat=False)
        prompts = P.parse_prompts(body)
        suffix = P.typed(body, "suffix", (str,), "a string")
        if suffix is not None:
            limits.check_text_size([suffix], "suffix")
        cfg = server.lookup(params.model)

        def build(backend: Backend) -> list[list[int]]:
            server.check_engine(params, {"grammar": "grammar" if body.get("grammar") else "json_schema"})
            out = []
            for j, prompt in enumerate(prompts):
                if isinstance(prompt, list):
                    bad = [t for t in prompt if t >= backend.model.n_vocab]
                    if bad:
                        raise invalid("prompt", f"token id {bad[0]} is outside the vocabulary of {backend.model.n_vocab}.")
                    out.append(list(prompt))
                else:
                    out.append(backend.model.tokenize(prompt, add_special=True, parse_special=True))
                if suffix is not None:  # fill in the middle: this prompt before, the suffix after
                    out[-1] = fim.suffix_prompt(backend.model, cfg.id, prompt, suffix, n_ctx=backend.n_ctx_seq,
                                                n_predict=params.max_tokens or -1)
            return out

        group = await server.submit(params, cfg, build)
        choices = Choices(False, params.model or cfg.id, params, None, len(group.jobs))
        return await respond(request, group, params, choices)

    async def embeddings(request: Request) -> Response:
        body = await read_json(request, limit)
        params = P.parse_embeddings(body)
        cfg, vectors, n_tokens = await server.embed_texts(params.model, params.inputs)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if params.base64 else v}
                for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "model": params.model or cfg.id, "data": data,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    async def list_models(request: Request) -> Response:
        loaded = server.pool.loaded()
        data = [{"id": cfg.id, "object": "model", "created": server.started, "owned_by": "ggufrun",
                 "aliases": [n for n in cfg.served_names if n != cfg.id],
                 "status": loaded.get(cfg.id, "not loaded")} for cfg in server.config.models]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(request: Request) -> Response:
        """``GET /v1/models/{id}`` (openai's ``models.retrieve``): served names only, as for requests."""
        name = request.path_params["name"]
        if len(name) > P.MAX_NAME:
            raise invalid("model", f"model names are at most {P.MAX_NAME} characters (got {len(name)}).")
        cfg = server.lookup(name)
        return JSONResponse({"id": name, "object": "model", "created": server.started, "owned_by": "ggufrun",
                             "status": server.pool.loaded().get(cfg.id, "not loaded")})

    return [Route("/v1/models", list_models, methods=["GET"]), Route("/v1/models/{name:path}", get_model, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"])]
