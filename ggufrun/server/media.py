"""Images in requests: every API's image parts become ``{"type": "image", "source": ...}`` content
parts (OpenAI ``image_url``, Responses ``input_image``, Anthropic ``image`` blocks, Ollama
``images``); off the event loop they are fetched or decoded, checked with Pillow, encoded by the
model's projector and spliced into the prompt as image tokens (ggufrun.images).

Remote URLs are fetched only when the server was started with ``--allow-image-urls``: a server
that fetches what a request names can be turned against its own network.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Callable, Mapping, Sequence, TypeVar

from ..images import LOW_SIDE, MAX_IMAGE_BYTES, MAX_SIDE, ImageError, chat_tokens_with_images, encode_picture, load_picture
from .api_errors import ApiError

T = TypeVar("T")

URL_TIMEOUT = 10.0
_pool: Any = None


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` for a request with images, in threads of their own: a request waits there
    for a free context of the projector (--image-encoders of them; an encode takes seconds on a
    CPU), and in the default executor, which every request's prompt is built in, 16 such requests
    held all its threads, so a text request waited behind pictures it did not send."""
    import asyncio
    import os
    from concurrent.futures import ThreadPoolExecutor

    global _pool
    if _pool is None:
        # pictures are decoded and cut (libmtmd preprocessing) in parallel, encoded by the projector's pool
        _pool = ThreadPoolExecutor(max_workers=max(4, os.cpu_count() or 1), thread_name_prefix="images")
    return await asyncio.get_running_loop().run_in_executor(_pool, fn, *args)


class Where(str):
    """The field an image came in through another API (input[0].content[1], messages[0].images[0]),
    carried on the OpenAI part its translator makes, so that a 400 names the client's own field.
    A str subclass no JSON body can hold."""


def image_part(source: str, where: str, *, media_type: str | None = None, max_side: int = MAX_SIDE) -> dict[str, Any]:
    """A content part standing for one image: ``source`` is a data: URL, an http(s) URL or
    (with ``media_type``) bare base64, scaled down to ``max_side``. Checked when the prompt is built."""
    if not isinstance(source, str) or not source:
        raise ApiError(400, f"'{where}' must be a non-empty string (a data: URL or base64 image).", param=where)
    return {"type": "image", "source": source, "media_type": media_type, "where": where, "max_side": max_side}


def has_images(messages: Sequence[Mapping[str, Any]]) -> bool:
    return any(isinstance(m.get("content"), list) and any(isinstance(p, Mapping) and p.get("type") == "image"
                                                          for p in m["content"]) for m in messages)


def _bytes(part: Mapping[str, Any], allow_urls: bool) -> bytes:
    where, source = part["where"], part["source"]
    if part.get("media_type") is not None:  # bare base64 (Anthropic, Ollama)
        return _b64(source, where)
    if source.startswith("data:"):
        header, comma, payload = source.partition(",")
        if not comma or ";base64" not in header:
            raise ApiError(400, f"'{where}': a data: URL must be base64 (data:image/png;base64,...).", param=where)
        return _b64(payload, where)
    if source.startswith(("http://", "https://")):
        if not allow_urls:
            raise ApiError(400, f"'{where}': this server does not fetch image URLs; send the image as a data: URL "
                           "(or start the server with --allow-image-urls).", param=where)
        return _fetch(source, where)
    raise ApiError(400, f"'{where}': expected a data: URL or an http(s) URL.", param=where)


def _b64(text: str, where: str) -> bytes:
    if "\n" in text:  # line-wrapped, as `base64 FILE` writes it: Ollama's decoder skips the line ends
        text = text.replace("\r", "").replace("\n", "")
    if len(text) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ApiError(400, f"'{where}': the image is larger than {MAX_IMAGE_BYTES >> 20} MB.", param=where)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"'{where}': the image is not valid base64.", param=where) from None


def _fetch(url: str, where: str) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "ggufrun"}), timeout=URL_TIMEOUT) as r:
            data = r.read(MAX_IMAGE_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ApiError(400, f"'{where}': could not fetch the image ({getattr(exc, 'reason', exc)}).", param=where) from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ApiError(400, f"'{where}': the image is larger than {MAX_IMAGE_BYTES >> 20} MB.", param=where)
    return data


def prompt_tokens(backend: Any, model_id: str, messages: list[dict[str, Any]], *, allow_urls: bool, images: list[Any],
                  **render: Any) -> list[int]:
    """The chat prompt of ``messages`` with their images encoded in place; the embeddings the
    tokens name are appended to ``images`` (the request holds them while it lives). Runs the
    projector: call it off the event loop. Raises ApiError (400) for a model without vision or a
    bad image."""
    if backend.vision is None:
        raise ApiError(400, f"Model '{model_id}' does not see images (it was loaded without a vision projector: "
                       "serve a vision model, or give it one with --mmproj).", param=_first_where(messages))
    model = backend.model
    blocks = []
    for m in messages:
        for part in m["content"] if isinstance(m.get("content"), list) else ():
            if not (isinstance(part, Mapping) and part.get("type") == "image"):
                continue
            try:
                picture = load_picture(_bytes(part, allow_urls), what=f"'{part['where']}'",
                                       max_side=part.get("max_side", MAX_SIDE))
                blocks.append(encode_picture(backend.vision, model, picture, images))
            except ImageError as exc:
                raise ApiError(400, exc.message, param=part["where"]) from None
    try:
        tokens = chat_tokens_with_images(render.pop("template"), model, messages, blocks, **render)
    except ImageError as exc:
        raise ApiError(400, exc.message, param="messages") from None
    if tokens and tokens[-1] < 0:
        raise ApiError(400, "The prompt ends with an image; the model answers after text.", param="messages")
    return tokens


def _first_where(messages: Sequence[Mapping[str, Any]]) -> str:
    for m in messages:
        for p in m["content"] if isinstance(m.get("content"), list) else ():
            if isinstance(p, Mapping) and p.get("type") == "image":
                return str(p["where"])
    return "messages"


def openai_content(content: Any, where: str) -> list[dict[str, Any]] | None:
    """OpenAI chat content holding ``image_url`` parts as text and image parts; None when it holds
    no image (protocol.text_of reads it, refusing any other part by name)."""
    if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") == "image_url" for p in content):
        return None
    out: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):  # type: ignore[union-attr]
            out.append({"type": "text", "text": part["text"]})  # type: ignore[index]
        elif kind == "image_url":
            image = part.get("image_url")  # type: ignore[union-attr]
            url = image.get("url") if isinstance(image, dict) else image
            detail = image.get("detail", "auto") if isinstance(image, dict) else "auto"
            if detail not in ("auto", "low", "high"):
                raise ApiError(400, f"Invalid '{at}.image_url.detail': expected auto, low or high.", param=f"{at}.image_url.detail")
            named = part.get("where")  # type: ignore[union-attr]
            out.append(image_part(url if isinstance(url, str) else "", named if isinstance(named, Where) else f"{at}.image_url.url",
                                  max_side=LOW_SIDE if detail == "low" else MAX_SIDE))
        else:
            raise ApiError(400, f"Invalid '{at}': expected a text or image_url part.", param=at)
    return out


# ---- the other APIs' image parts, as OpenAI image_url parts (their translators build OpenAI bodies)

ANTHROPIC_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


def _refused(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


def _url_part(url: str, where: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}, "where": Where(where)}


def anthropic_image(block: Mapping[str, Any], at: str) -> dict[str, Any]:
    """An Anthropic ``image`` block (base64 or url source) as an OpenAI part; Refused otherwise."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        media_type, data = source.get("media_type"), source.get("data")  # type: ignore[union-attr]
        if media_type not in ANTHROPIC_TYPES:
            raise _refused(f"{at}.source.media_type", f"'{at}.source.media_type' must be one of {', '.join(ANTHROPIC_TYPES)}.")
        if not isinstance(data, str) or not data:
            raise _refused(f"{at}.source.data", f"'{at}.source.data' must be the image in base64.")
        return _url_part(f"data:{media_type};base64,{data}", f"{at}.source.data")
    if kind == "url" and isinstance(source.get("url"), str):  # type: ignore[union-attr]
        return _url_part(source["url"], f"{at}.source.url")  # type: ignore[index]
    raise _refused(f"{at}.source", f"'{at}.source' must be {{type: base64, media_type, data}} or {{type: url, url}}.")


def responses_content(content: Any, where: str) -> list[dict[str, Any]] | None:
    """Responses message content holding ``input_image`` parts as OpenAI parts; None without one."""
    if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") == "input_image" for p in content):
        return None
    out: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "text") and isinstance(part.get("text"), str):  # type: ignore[union-attr]
            out.append({"type": "text", "text": part["text"]})  # type: ignore[index]
        elif kind == "input_image":
            if part.get("file_id") is not None:  # type: ignore[union-attr]
                raise _refused(f"{at}.file_id", f"'{at}.file_id' is not supported (no file store): send image_url.")
            url = part.get("image_url")  # type: ignore[union-attr]
            if not isinstance(url, str) or not url:
                raise _refused(f"{at}.image_url", f"'{at}.image_url' must be a data: URL (or an http(s) URL).")
            out.append(_url_part(url, f"{at}.image_url"))
        else:
            raise _refused(at, f"'{at}': content of type {kind!r} is not supported (input_text, input_image).")
    return out


def ollama_content(text: str, images: Any, where: str) -> list[dict[str, Any]]:
    """An Ollama message's ``images`` (base64 strings) before its text, as OpenAI parts."""
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise _refused(where, f"'{where}' must be a list of base64-encoded images.")
    return [*(_url_part(f"data:image/*;base64,{i}", f"{where}[{k}]") for k, i in enumerate(images)),
            {"type": "text", "text": text}]


def as_text(messages: list[dict[str, Any]], marker: str = "<__media__>") -> list[dict[str, Any]]:
    """Messages with each image as libmtmd's media marker in its text (what /apply-template shows)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list) and any(isinstance(p, Mapping) and p.get("type") == "image" for p in content):
            text = "".join(marker if p.get("type") == "image" else p.get("text", "") for p in content if isinstance(p, Mapping))
            m = {**m, "content": text}
        out.append(m)
    return out
