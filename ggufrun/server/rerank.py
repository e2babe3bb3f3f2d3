"""llama-server's reranking (``/rerank``, ``/reranking``, ``/v1/rerank``, ``/v1/reranking``) for
reranker GGUFs (rank pooling: bge-reranker-v2-m3, Qwen3-Reranker): each (query, document) pair
is one prompt, built as llama-server's format_prompt_rerank builds it, scored by the model's
classification head on the embedding path of the model's one engine.

Jina's shape (``documents``; ``results`` of ``index`` and ``relevance_score``, best first, cut to
``top_n``) or TEI's (``texts``, a bare list of ``index`` and ``score``, ``return_text``).
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Any

from .api_errors import ApiError, invalid
from .core import backend_for
from .limits import MAX_EMBED_INPUTS, check_text_size

if TYPE_CHECKING:
    from .core import Server

FIELDS = {"model", "query", "documents", "texts", "top_n", "return_text"}


def prompt_tokens(model: Any, query: str, documents: list[str]) -> list[list[int]]:
    """Each (query, document) pair's tokens: the GGUF's rerank template with {query} and {document}
    filled in (Qwen3-Reranker), else [BOS] query [EOS] [SEP] document [EOS] as the vocabulary adds
    them (EOS falling back to SEP), as llama-server's format_prompt_rerank. The template, the
    special tokens and the query's tokens are read once for all the documents."""
    template = model.named_template("rerank")
    if template is not None:
        filled = template.replace("{query}", query)
        return [model.tokenize(filled.replace("{document}", d), add_special=False, parse_special=True) for d in documents]
    sp = model.vocab_specials()
    eos = model.eos_id if model.eos_id >= 0 else sp["sep"]
    head = [model.bos_id] if sp["add_bos"] and model.bos_id >= 0 else []
    head += model.tokenize(query, add_special=False, parse_special=False) if query else []
    head += [eos] if sp["add_eos"] and eos >= 0 else []
    head += [sp["sep"]] if sp["add_sep"] and sp["sep"] >= 0 else []
    tail = [eos] if sp["add_eos"] and eos >= 0 else []
    return [head + (model.tokenize(d, add_special=False, parse_special=False) if d else []) + tail for d in documents]


async def rerank(server: Server, body: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
    """The reply to a rerank body; raise ApiError (400) for a bad body or a model that is no reranker."""
    for key in body:
        if key not in FIELDS:
            raise ApiError(400, f"Unrecognized request argument supplied to /rerank: '{key}'.", param=key)
    tei = "texts" in body
    if tei and "documents" in body:
        raise invalid("texts", "send 'documents' (Jina's shape) or 'texts' (TEI's), not both.")
    key = "texts" if tei else "documents"
    query, docs = body.get("query"), body.get(key)
    if not isinstance(query, str):
        raise invalid("query", "must be provided, as a string.")
    if not isinstance(docs, list) or not docs or not all(isinstance(d, str) for d in docs):
        raise invalid(key, "must be a non-empty string array.")
    if len(docs) > MAX_EMBED_INPUTS:
        raise invalid(key, f"at most {MAX_EMBED_INPUTS} documents per request (got {len(docs)}).")
    check_text_size([query] * len(docs) + docs, key)
    top_n = body.get("top_n", len(docs))
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
        raise invalid("top_n", "expected a count of results (0 or more).")
    return_text = body.get("return_text", False)
    if not isinstance(return_text, bool) or (return_text and not tei):
        raise invalid("return_text", "true or false, with 'texts' (TEI's shape; Jina's has no text in its results).")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", "expected a string.")
    async with backend_for(server, model) as (backend, cfg):
        if not backend.model.ranks:
            raise ApiError(400, f"Model '{cfg.id}' is not a reranker: reranking needs a GGUF with rank pooling "
                           "(bge-reranker-v2-m3, Qwen3-Reranker).", param="model", kind="not_supported_error")
        pairs = await asyncio.to_thread(prompt_tokens, backend.model, query, docs)
    try:
        cfg, scores, n_tokens = await server.embed_texts(model, pairs, rank=True)
    except ApiError as exc:  # the embedding path names its inputs; these are the documents
        if exc.param and exc.param.startswith("input"):
            param = key + exc.param[len("input"):]
            raise ApiError(exc.status, exc.message.replace(f"'{exc.param}'", f"'{param}'"), param=param, kind=exc.kind) from None
        raise
    label = "score" if tei else "relevance_score"
    results: list[dict[str, Any]] = [{"index": i, label: s[0] if s else -1e6} for i, s in enumerate(scores)]
    for r in results:
        if return_text:
            r["text"] = docs[r["index"]]
    results.sort(key=lambda r: -r[label])
    results = results[:top_n]
    if tei:
        return results
    return {"model": model or cfg.id, "object": "list", "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            "results": results}


def renormalise(vector: list[float], norm: int) -> list[float]:
    """An L2-normalised vector under llama-server's ``embd_normalize`` (0 max absolute, 1 taxicab,
    2 Euclidean, p > 2 p-norm): the same direction, so the same as normalising the raw vector."""
    if norm == 2:
        return vector
    if norm == 0:
        scale = max((abs(v) for v in vector), default=0.0) / 32760.0  # llama.cpp's common_embd_normalize: int16 range
    else:  # taken relative to the largest element: a large p would underflow every term to 0 otherwise
        top = max((abs(v) for v in vector), default=0.0)
        scale = top * math.fsum((abs(v) / top) ** norm for v in vector) ** (1.0 / norm) if top else 0.0
    return [v / scale for v in vector] if scale else vector
