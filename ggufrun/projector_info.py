"""Checks on a vision projector (mmproj GGUF) before libmtmd opens it: clip.cpp asserts (aborting
the process) on shapes it trusts, so the keys and tensors it reads are checked here first, and a
projector made for another text model is named as such."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidGGUFError

# projector types whose layout is checked here and that the engine decodes (others are refused by name)
SUPPORTED = ("idefics3", "gemma3", "qwen2.5vl_merger", "qwen3vl_merger")
_MAX = 1 << 16


@dataclass(frozen=True)
class ProjectorInfo:
    """What `show` and the loader say about a projector."""

    path: Path
    projector_type: str
    text_n_embd: int  # the text model width it feeds
    image_size: int
    tokens_per_tile: int
    file_size: int
    deepstack: int = 0  # Qwen3-VL: vision layers whose features widen each image row by another text width


def _bad(path: Path, what: str) -> InvalidGGUFError:
    return InvalidGGUFError(f"{path} is not a usable vision projector: {what}.")


def inspect_projector(path: str | Path) -> ProjectorInfo:
    """Read and check a projector's header and tensor shapes. Raises InvalidGGUFError,
    UnsupportedProjectorError (a real projector ggufrun does not decode)."""
    from .gguf_info import inspect

    return check_projector(inspect(path))  # structure first: magic, version, truncation, offsets


def check_projector(info: Any) -> ProjectorInfo:
    """inspect_projector's checks on a parsed header (a gguf_info.GGUFInfo, local or read from a hub)."""
    p, meta = info.path, info.metadata
    if info.architecture != "clip":
        raise _bad(p, f"its architecture is {info.architecture!r}, not clip (is it the model itself?)")
    if meta.get("clip.has_vision_encoder") is not True:
        raise _bad(p, "it has no vision encoder (an audio-only projector?)")
    kind = meta.get("clip.projector_type") or meta.get("clip.vision.projector_type")
    if not isinstance(kind, str) or not kind:
        raise _bad(p, "clip.projector_type is missing")
    if kind not in SUPPORTED:  # a real projector libmtmd knows, but not one ggufrun decodes: never opened
        from .images import UnsupportedProjectorError

        raise UnsupportedProjectorError(f"{p.name} is a {kind[:40]} projector, which ggufrun does not decode yet "
                                        f"(it decodes {', '.join(SUPPORTED)}).",
                                        "Use SmolVLM, gemma-3, Qwen2.5-VL or Qwen3-VL for images, or llama-server for this model.")

    def num(key: str, default: int | None = None) -> int:
        v = meta.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= _MAX:
            raise _bad(p, f"{key} is {v!r} (a whole number from 1 to {_MAX} is needed)")
        return v

    e, ff, n_layer, n_head = (num(f"clip.vision.{k}") for k in (
        "embedding_length", "feed_forward_length", "block_count", "attention.head_count"))
    image, patch = num("clip.vision.image_size"), num("clip.vision.patch_size")
    qwen3 = kind == "qwen3vl_merger"
    qwen = qwen3 or kind == "qwen2.5vl_merger"
    if qwen:
        scale = num("clip.vision.spatial_merge_size", 2)
    else:
        scale = num("clip.vision.projector.scale_factor", 4 if kind == "gemma3" else None)
    if qwen and scale != 2:  # clip.cpp merges 2x2 (merge_ratio = 2)
        raise _bad(p, f"spatial_merge_size is {scale}, 2 expected")
    if qwen and not qwen3 and num("clip.vision.n_wa_pattern") > n_layer:
        raise _bad(p, f"n_wa_pattern is over {n_layer} layers")
    if qwen and not qwen3 and patch > 56:  # clip.cpp's 112-pixel windows: 112 // patch // 2 = 0 loops forever
        raise _bad(p, f"patch size {patch} is over 56 (Qwen2.5-VL's attention windows would be empty)")
    if e % n_head:
        raise _bad(p, f"width {e} is not a multiple of {n_head} heads")
    if image % patch:
        raise _bad(p, f"image size {image} is not a multiple of patch size {patch}")
    side = image // patch
    if scale < 2 or side % scale:
        raise _bad(p, f"{side} patches a side do not merge by {scale}")
    for key in ("clip.vision.image_mean", "clip.vision.image_std"):
        v = meta.get(key)
        if not isinstance(v, list) or len(v) < 3:
            raise _bad(p, f"{key} needs 3 values")
    shapes = {t.name: t.shape for t in info.tensors}

    def need(name: str, shape: tuple[int, ...]) -> None:
        got = shapes.get(name)
        if got is None:
            raise _bad(p, f"tensor {name} is missing")
        if tuple(got) != shape:
            raise _bad(p, f"tensor {name} has shape {tuple(got)}, {shape} expected")

    need("v.patch_embd.weight", (patch, patch, 3, e))
    if qwen:
        need("v.patch_embd.weight.1", (patch, patch, 3, e))
        # clip.cpp's Qwen graphs assert (abort) on a class embedding, and Qwen2.5-VL's on a patch bias
        for name in ("v.class_embd", *(() if qwen3 else ("v.patch_embd.bias",))):
            if name in shapes:
                raise _bad(p, f"tensor {name} is not one a {kind} projector has")
    if qwen3:  # learned positions on a square grid, interpolated to the picture (clip.cpp asserts both)
        need("v.patch_embd.bias", (e,))
        grid = shapes.get("v.position_embd.weight")
        if grid is None or len(grid) != 2 or grid[0] != e or round(grid[1] ** 0.5) ** 2 != grid[1]:
            raise _bad(p, f"tensor v.position_embd.weight has shape {grid}, ({e}, a square) expected")
    elif not qwen:
        need("v.position_embd.weight", (e, side * side))
    for i in range(n_layer):
        if qwen3:
            need(f"v.blk.{i}.attn_qkv.weight", (e, 3 * e))
            need(f"v.blk.{i}.attn_qkv.bias", (3 * e,))
            need(f"v.blk.{i}.attn_out.weight", (e, e))
        else:
            for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
                need(f"v.blk.{i}.{name}.weight", (e, e))
        need(f"v.blk.{i}.ffn_up.weight", (e, ff))
        need(f"v.blk.{i}.ffn_down.weight", (ff, e))
        # optional ones where present: ggml asserts (aborts) on a gate, norm or bias of another shape
        for name, shape in (("ffn_gate.weight", (e, ff)), ("ln1.weight", (e,)), ("ln2.weight", (e,))):
            if f"v.blk.{i}.{name}" in shapes:
                need(f"v.blk.{i}.{name}", shape)
    for name in ("v.pre_ln.weight", "v.post_ln.weight"):
        if name in shapes:
            need(name, (e,))
    for name, got in shapes.items():  # a bias adds to its weight's output: one value per output row
        weight = shapes.get(name[: -len(".bias")] + ".weight") if name.endswith(".bias") else None
        if weight is not None and len(weight) and tuple(got) != (weight[-1],):
            raise _bad(p, f"tensor {name} has shape {tuple(got)}, ({weight[-1]},) expected")
    if any(n.startswith(f"v.blk.{n_layer}.") for n in shapes):
        raise _bad(p, f"it holds more layers than block_count {n_layer}")
    deepstack = 0
    if qwen:  # the merger: 2x2 patches' features -> MLP -> the text model's width
        need("mm.0.weight", (e * 4, e * 4))
        out = shapes.get("mm.2.weight")
        if out is None or len(out) != 2 or out[0] != e * 4:
            raise _bad(p, f"tensor mm.2.weight has shape {out}, ({e * 4}, N) expected")
        text = out[1]
        need("mm.2.bias", (text,))
        for i in range(n_layer if qwen3 else 0):  # Qwen3-VL's deepstack mergers, the same shapes as the main one's
            if f"v.deepstack.{i}.fc1.weight" in shapes:  # what makes a layer deepstack to clip.cpp (has_deepstack)
                need(f"v.deepstack.{i}.norm.weight", (e * 4,))
                need(f"v.deepstack.{i}.fc1.weight", (e * 4, e * 4))
                need(f"v.deepstack.{i}.fc2.weight", (e * 4, text))
                need(f"v.deepstack.{i}.fc2.bias", (text,))
                deepstack += 1
    elif kind == "idefics3":
        fc = shapes.get("mm.model.fc.weight")
        if fc is None or len(fc) != 2 or fc[0] != e * scale * scale:
            raise _bad(p, f"tensor mm.model.fc.weight has shape {fc}, ({e * scale * scale}, N) expected")
        text = fc[1]
    else:
        proj = shapes.get("mm.input_projection.weight")
        need("mm.soft_emb_norm.weight", (e,))
        if proj is None or len(proj) != 2 or proj[1] != e:  # stored transposed: (text width, e)
            raise _bad(p, f"tensor mm.input_projection.weight has shape {proj}, (N, {e}) expected")
        text = proj[0]
    return ProjectorInfo(p, str(kind), int(text), image, (side // scale) ** 2, info.file_size, deepstack)


def validate_projector(path: str | Path, text_n_embd: int) -> ProjectorInfo:
    """inspect_projector, plus: it feeds a text model of width ``text_n_embd``."""
    pi = inspect_projector(path)
    if pi.text_n_embd != text_n_embd:
        raise InvalidGGUFError(f"{pi.path.name} feeds a text model of width {pi.text_n_embd}; this model's is {text_n_embd}.",
                               "Give the projector made for this model (--mmproj).")
    return pi


def is_projector(meta: dict[str, Any]) -> bool:
    """Whether GGUF metadata is a projector's (``general.architecture = clip``)."""
    return meta.get("general.architecture") == "clip"
