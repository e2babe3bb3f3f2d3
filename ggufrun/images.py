"""Images for vision models: checked and decoded with Pillow (hostile bytes never reach libmtmd's
own decoder), named by a hash of their bytes, and spliced into a chat prompt as *image tokens*.

Image tokens are negative ints standing for one embedding row each: ``-(key << 20) - 1 - row``,
``key`` from the image's hash. Equal images give equal tokens, so the KV cache's prefix reuse
works for a repeated image as it does for text, and ``len(tokens)`` counts an image's positions
in usage and context checks. No llama.cpp token is negative, so they never mix with text.
"""

from __future__ import annotations

import hashlib
import io
import secrets
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import ExitStatus, GgufrunError

MAX_IMAGE_BYTES = 20 << 20  # an encoded image; OpenAI's own limit is 20 MB
MAX_PIXELS = 50_000_000  # decoded width x height (Pillow's decompression-bomb guard is ~89 M)
MAX_SIDE = 2048  # images are scaled down to this longest side before the projector sees them
LOW_SIDE = 512  # OpenAI's image_url detail "low": a 512-pixel image (fewer tiles on a projector that tiles)
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_ROW_BITS = 20  # up to a million rows per image chunk


class ImageError(GgufrunError):
    """An image a request or a file carries that cannot be used (format, size, corrupt bytes)."""

    http_status = 400


class UnsupportedProjectorError(GgufrunError):
    """A real projector whose layout ggufrun does not check and decode yet (Qwen2-VL, Pixtral...)."""

    exit_status = ExitStatus.USAGE


class NoVisionError(GgufrunError):
    """Images sent to a model without a vision projector."""

    http_status = 400


@dataclass(frozen=True)
class Picture:
    """A checked image: RGB pixels, row-major, 3 bytes a pixel; ``digest`` of the original bytes (and the size they were scaled to, where not the default)."""

    width: int
    height: int
    rgb: bytes
    digest: bytes


def load_picture(data: bytes, *, what: str = "image", max_bytes: int = MAX_IMAGE_BYTES, max_side: int = MAX_SIDE) -> Picture:
    """Decode image bytes (PNG, JPEG, WebP, GIF, BMP) into a Picture, scaled down to ``max_side``.
    Raises ImageError naming ``what`` for anything else, an oversized image or corrupt bytes."""
    if not data:
        raise ImageError(f"{what} is empty.")
    if len(data) > max_bytes:
        raise ImageError(f"{what} is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB.")
    from PIL import Image

    _quiet_pillow(Image)
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or "?"
            if fmt not in FORMATS:
                raise ImageError(f"{what} is {fmt}; send one of {', '.join(FORMATS)}.")
            if img.width < 1 or img.height < 1 or img.width * img.height > MAX_PIXELS:
                raise ImageError(f"{what} is {img.width}x{img.height} pixels; the limit is {MAX_PIXELS:,} pixels.")
            img.seek(0)  # the first frame of an animation
            rgb = img.convert("RGB")
            if max(rgb.size) > max_side:
                rgb.thumbnail((max_side, max_side))
            rgb.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.UnidentifiedImageError) as exc:
        raise ImageError(f"{what} is not an image ggufrun can read ({exc.__class__.__name__}).",
                         f"Send one of {', '.join(FORMATS)}.") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"{what} is corrupt or truncated ({exc}).") from None
    # the same bytes at another size are another picture (its embeddings and cached prefix differ)
    h = hashlib.sha256(data)  # (not data + suffix: a copy of up to the whole upload)
    if max_side != MAX_SIDE:
        h.update(f"\0{max_side}".encode())
    return Picture(rgb.width, rgb.height, rgb.tobytes(), h.digest())


def _quiet_pillow(Image: Any) -> None:
    """Silence Pillow's DecompressionBombWarning (over ~89 M pixels): MAX_PIXELS refuses those
    images anyway, and each size a client sends would otherwise print its own warning on stderr.
    Added on every call (filterwarnings replaces an equal filter): a caller may reset the filters."""
    import warnings

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def image_tokens(seed: bytes, n: int) -> tuple[int, list[int]]:
    """(key, the ``n`` image tokens) for an image chunk named by ``seed`` (its bytes' hash)."""
    key = int.from_bytes(hashlib.sha256(seed).digest()[:8], "little") >> 1 or 1
    base = -(key << _ROW_BITS) - 1
    return key, list(range(base, base - n, -1))


def image_row(token: int) -> tuple[int, int]:
    """(key, row) of an image token."""
    v = -token - 1
    return v >> _ROW_BITS, v & ((1 << _ROW_BITS) - 1)


def run_end(tokens: Sequence[int], limit: int, *, whole: bool = False) -> int:
    """How many leading ``tokens`` (at most ``limit``) are all text or all image tokens: one
    decode batch holds either token ids or embeddings, so a prompt chunk stops where they change.
    ``whole``: an image is never cut (0 when it does not fit ``limit``: it waits for a roomier step)."""
    if not tokens or limit <= 0:
        return 0
    image = tokens[0] < 0
    n = min(limit, len(tokens))
    for i in range(1, n):
        if (tokens[i] < 0) != image:
            return i
    if whole and image and n < len(tokens) and tokens[n] < 0:
        return 0
    return n


def runs_end(tokens: Sequence[int], limit: int, *, whole: bool = False) -> int:
    """As :func:`run_end`, then as many more whole runs as fit in ``limit``: a sequence alone in
    a step decodes them in order, one llama_decode each (llama/vision.py), as it would one a
    step; the same decodes without an engine step between them (17 tiles of a SmolVLM picture:
    36 runs). A run the limit would cut is left for the next step, so the decodes stay the same."""
    n = run_end(tokens, limit, whole=whole)
    while 0 < n < min(limit, len(tokens)) and (tokens[n - 1] < 0) != (tokens[n] < 0):
        image, j = tokens[n] < 0, n + 1
        while j < len(tokens) and j <= limit and (tokens[j] < 0) == image:
            j += 1
        if j > limit:
            break
        n = j
    return n


def count_runs(tokens: Sequence[int]) -> int:
    """Runs of text or image tokens in ``tokens`` (a llama_decode each, at least)."""
    return sum(1 for i, t in enumerate(tokens) if i == 0 or (t < 0) != (tokens[i - 1] < 0))


def chat_tokens_with_images(template: Any, model: Any, messages: list[dict[str, Any]],
                            blocks: Sequence[list[int]], *, add_generation_prompt: bool = True,
                            tools: Sequence[Any] | None = None, variables: Mapping[str, Any] | None = None) -> list[int]:
    """Render ``messages`` whose content parts include ``{"type": "image"}`` placeholders (in
    order, one per entry of ``blocks``, each a projector's tokens for one picture) and tokenize
    them, splicing each picture's tokens where it stands. Raises ImageError, TemplateError."""
    import re

    nonce = secrets.token_hex(8)
    mark = f"\ue010{nonce}\ue011"
    count = 0

    def flat(content: Any) -> Any:
        nonlocal count
        if not isinstance(content, list):
            return content
        out = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "image":
                count += 1
                out.append(mark)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                out.append(part["text"])
        return "".join(out)

    flattened = [dict(m, content=flat(m.get("content"))) for m in messages]
    if count != len(blocks):
        raise ImageError(f"{count} image places for {len(blocks)} images.")
    text = template.render(flattened, add_generation_prompt=add_generation_prompt, tools=tools, variables=variables)
    parts = re.split(re.escape(mark), text)
    if len(parts) != len(blocks) + 1:
        raise ImageError("The chat template dropped or repeated an image.", "Try --template chatml.")
    tokens: list[int] = []
    for k, part in enumerate(parts):
        if part or k == 0:
            tokens += model.tokenize(part, add_special=k == 0, parse_special=True)
        if k < len(blocks):
            tokens += blocks[k]
    if len(tokens) > 1 and tokens[0] == tokens[1] == model.bos_id:
        del tokens[0]
    return tokens


def pictures_in(messages: list[dict[str, Any]]) -> list[Picture]:
    """The Picture of every ``{"type": "image", "picture": ...}`` part, in order."""
    return [p["picture"] for m in messages if isinstance(m.get("content"), list) for p in m["content"]
            if isinstance(p, Mapping) and p.get("type") == "image"]


def read_picture(path: Any, vision: Any, model_name: str) -> Picture:
    """An image file for a chat message. Raises NoVisionError (``vision`` None), ImageError."""
    from pathlib import Path

    if vision is None:
        raise NoVisionError(f"{model_name} does not see images (it has no vision projector).",
                            "Use a vision model (ggufrun list), or give it one with --mmproj FILE.")
    if getattr(vision, "reason", None):  # vision.TextOnly: a projector ggufrun cannot decode yet
        raise NoVisionError(f"{model_name} reads text only here: {vision.reason}")
    p = Path(path)
    try:
        if not p.is_file():
            raise ImageError(f"No image file at {p}.")
        if p.stat().st_size > MAX_IMAGE_BYTES:
            raise ImageError(f"{p} is {p.stat().st_size / 1e6:.1f} MB; the limit is {MAX_IMAGE_BYTES / 1e6:.0f} MB.")
        data = p.read_bytes()
    except OSError as exc:
        raise ImageError(f"Cannot read {p}: {exc.strerror}.") from None
    return load_picture(data, what=str(p))


def session_blocks(vision: Any, model: Any, messages: list[dict[str, Any]]) -> tuple[list[list[int]], list[Any]]:
    """Every picture's tokens in ``messages`` (the projector keeps recent ones encoded), and the
    embeddings they name (registered with the model; hold them while the tokens are decoded)."""
    held: list[Any] = []
    return [encode_picture(vision, model, pic, held) for pic in pictures_in(messages)], held


def encode_picture(vision: Any, model: Any, pic: Picture, held: list[Any]) -> list[int]:
    """``pic``'s tokens from ``vision``; the embeddings they name are registered with ``model``, one
    object per key (an image two requests share stays while either holds it), and added to ``held``."""
    tokens, embeds = vision.block(pic)
    held.extend(model.images.setdefault(e.key, e) for e in embeds)
    return tokens
