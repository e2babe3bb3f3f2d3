"""Random-weight vision projectors (``mmproj`` GGUFs) in the exact layout llama.cpp's libmtmd
loads (tools/mtmd/clip.cpp: ``clip.*`` keys, ``v.*``/``mm.*`` tensors), paired with a synthetic
text model of matching width, so that the image path (load, tokenize, encode, decode) runs offline
on real files.

Projector kinds:

- ``smolvlm`` (``clip.projector_type = idefics3``): a SigLIP ViT, pixel shuffle by the scale
  factor, one linear layer into the text model's width. Images are cut into ``image_size`` tiles
  plus an overview (``preproc_image_size`` is the longest edge); each tile gives
  ``(image_size / patch_size / scale)^2`` tokens. Causal text attention, one position per token:
  the kind ggufrun's engine batches.
- ``qwen25vl`` (``clip.projector_type = qwen2.5vl_merger``): Qwen2.5-VL's ViT (two patch convolutions,
  RMS norms, gated SiLU FFNs, window attention every ``n_wa_pattern`` layers), 2x2 patches
  merged by an MLP. Any image size (cut to multiples of 2 patches): one token per 2x2 patches,
  and M-RoPE positions: an image of nx x ny tokens takes max(nx, ny) positions.
- ``qwen3vl`` (``qwen3vl_merger``): Qwen3-VL's ViT (fused QKV, layer norms, GELU FFNs, learned
  position embeddings interpolated to the picture), the same 2x2 merge and M-RoPE positions, and
  *deepstack*: ``deepstack`` layers' features, merged alike, are appended to each image row, which
  is then (1 + deepstack) times the text width (the text model adds them to its first layers).
- ``gemma3``: a SigLIP ViT, 4x4 average pooling, RMS norm and a projection; a fixed
  ``image_size`` square (256 tokens at the real 896). llama.cpp decodes its image tokens with
  non-causal attention.

Sizes: ``tiny`` (a few hundred KB, tests), ``small`` (CPU benchmarks) and ``full`` (the published model's vision tower:
SmolVLM-256M/500M's SigLIP-B/16 at 512 px; gemma-3-4b's SigLIP-So400m/14 at 896 px).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, DiskSpaceError


@dataclass(frozen=True)
class ProjectorSpec:
    """The hyperparameters that fix a projector's tensor shapes and image preprocessing."""

    kind: str  # "smolvlm" | "gemma3" | "qwen25vl" | "qwen3vl"
    n_embd: int  # the vision tower's width
    n_ff: int
    n_layer: int
    n_head: int
    image_size: int
    patch_size: int
    scale: int  # idefics3: pixel-shuffle factor; gemma3: pooling kernel
    longest_edge: int = 0  # idefics3: the longest edge images are resized to before tiling
    wa_pattern: int = 0  # qwen25vl: every n-th layer attends in full, the others in windows
    deepstack: tuple[int, ...] = ()  # qwen3vl: the layers whose features are appended to the image rows
    eps: float = 1e-6

    @property
    def projector_type(self) -> str:
        return {"smolvlm": "idefics3", "gemma3": "gemma3", "qwen25vl": "qwen2.5vl_merger", "qwen3vl": "qwen3vl_merger"}[self.kind]

    def tokens_per_tile(self) -> int:
        side = self.image_size // self.patch_size // self.scale
        return side * side


PROJECTORS: dict[str, ProjectorSpec] = {
    "smolvlm-tiny": ProjectorSpec("smolvlm", n_embd=32, n_ff=64, n_layer=2, n_head=2, image_size=32, patch_size=8,
                                  scale=2, longest_edge=64),
    # SmolVLM's layout (tiles + overview, pixel shuffle) at a size a CPU encodes in a fraction of a
    # second a picture (2x2 tiles of 256 px + overview, 16 tokens each): bench runs on a CPU, where
    # the full tower's 17 tiles cost a minute or more a picture
    "smolvlm-small": ProjectorSpec("smolvlm", n_embd=256, n_ff=1024, n_layer=2, n_head=4, image_size=256, patch_size=16,
                                   scale=4, longest_edge=512),
    # SmolVLM-256M/500M-Instruct's vision tower (SigLIP base patch16 at 512 px, scale factor 4,
    # longest edge 2048 = up to 4x4 tiles + overview of 64 tokens each)
    "smolvlm": ProjectorSpec("smolvlm", n_embd=768, n_ff=3072, n_layer=12, n_head=12, image_size=512, patch_size=16,
                             scale=4, longest_edge=2048),
    "gemma3-tiny": ProjectorSpec("gemma3", n_embd=32, n_ff=64, n_layer=2, n_head=2, image_size=56, patch_size=14,
                                 scale=2),
    # scale: the 2x2 patch merge; image_size: the size `show` reports tokens for (images take any size)
    "qwen25vl-tiny": ProjectorSpec("qwen25vl", n_embd=32, n_ff=64, n_layer=2, n_head=2, image_size=64, patch_size=8,
                                   scale=2, wa_pattern=2),
    "qwen25vl-small": ProjectorSpec("qwen25vl", n_embd=256, n_ff=512, n_layer=2, n_head=4, image_size=448, patch_size=14,
                                    scale=2, wa_pattern=2),
    # Qwen2.5-VL-3B/7B's vision tower (32 layers of 1280, patch 14, full attention every 8th layer)
    "qwen25vl": ProjectorSpec("qwen25vl", n_embd=1280, n_ff=3420, n_layer=32, n_head=16, image_size=448, patch_size=14,
                              scale=2, wa_pattern=8),
    "qwen3vl-tiny": ProjectorSpec("qwen3vl", n_embd=32, n_ff=64, n_layer=2, n_head=2, image_size=64, patch_size=8,
                                  scale=2, deepstack=(0,)),
    # Qwen3-VL-2B/4B's vision tower (24 layers of 1024, patch 16, 48x48 learned positions, deepstack from 3 layers)
    "qwen3vl": ProjectorSpec("qwen3vl", n_embd=1024, n_ff=4096, n_layer=24, n_head=16, image_size=768, patch_size=16,
                             scale=2, deepstack=(5, 11, 17)),
    # gemma-3-4b/12b/27b's SigLIP-So400m/14 at 896 px: 64x64 patches pooled 4x4 -> 256 tokens
    "gemma3": ProjectorSpec("gemma3", n_embd=1152, n_ff=4304, n_layer=27, n_head=16, image_size=896, patch_size=14,
                            scale=4),
}

# The text tokens each kind's mtmd slice template looks up in the text vocabulary (mtmd.cpp
# lookup_token: a missing one becomes token -1 in the prompt, which llama_decode rejects).
VISION_TOKENS: dict[str, tuple[str, ...]] = {
    "smolvlm": ("\n\n", "<fake_token_around_image>", "<global-img>"),
    "gemma3": ("<start_of_image>", "<end_of_image>"),
    "qwen25vl": ("<|vision_start|>", "<|vision_end|>"),
    "qwen3vl": ("<|vision_start|>", "<|vision_end|>"),
}


def projector_spec(name: str) -> ProjectorSpec:
    """A ProjectorSpec by name; raise ConfigError listing the choices."""
    if name not in PROJECTORS:
        raise ConfigError(f"Unknown projector '{name}'.", f"Choose one of: {', '.join(PROJECTORS)}.")
    return PROJECTORS[name]


def plan_projector(spec: ProjectorSpec, text_n_embd: int) -> list[Any]:
    """The tensors of a projector file (synthetic.PlannedTensor rows), in llama.cpp's names."""
    e, n_patches = spec.n_embd, (spec.image_size // spec.patch_size) ** 2
    if spec.kind == "qwen25vl":
        return _sized(_plan_qwen25vl(spec, text_n_embd))
    if spec.kind == "qwen3vl":
        return _sized(_plan_qwen3vl(spec, text_n_embd))
    rows: list[tuple[str, tuple[int, ...], str, str]] = [
        ("v.patch_embd.weight", (spec.patch_size, spec.patch_size, 3, e), "F16", "weight"),
        ("v.patch_embd.bias", (e,), "F32", "bias"),
        ("v.position_embd.weight", (e, n_patches), "F32", "weight"),
    ]
    for i in range(spec.n_layer):
        b = f"v.blk.{i}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            rows += [(b + name + ".weight", (e, e), "F16", "weight"), (b + name + ".bias", (e,), "F32", "bias")]
        rows += [(b + "ln1.weight", (e,), "F32", "ones"), (b + "ln1.bias", (e,), "F32", "bias"),
                 (b + "ln2.weight", (e,), "F32", "ones"), (b + "ln2.bias", (e,), "F32", "bias"),
                 (b + "ffn_up.weight", (e, spec.n_ff), "F16", "weight"), (b + "ffn_up.bias", (spec.n_ff,), "F32", "bias"),
                 (b + "ffn_down.weight", (spec.n_ff, e), "F16", "weight"), (b + "ffn_down.bias", (e,), "F32", "bias")]
    rows += [("v.post_ln.weight", (e,), "F32", "ones"), ("v.post_ln.bias", (e,), "F32", "bias")]
    if spec.kind == "smolvlm":
        rows.append(("mm.model.fc.weight", (e * spec.scale * spec.scale, text_n_embd), "F16", "weight"))
    else:
        rows += [("mm.soft_emb_norm.weight", (e,), "F32", "ones"),
                 ("mm.input_projection.weight", (text_n_embd, e), "F16", "weight")]  # stored transposed
    return _sized(rows)


def _plan_qwen25vl(spec: ProjectorSpec, text_n_embd: int) -> list[tuple[str, tuple[int, ...], str, str]]:
    """Qwen2.5-VL's tensors as convert_hf_to_gguf.py names them (clip.cpp, models/qwen2vl.cpp)."""
    e, ff, merged = spec.n_embd, spec.n_ff, spec.n_embd * spec.scale * spec.scale
    rows: list[tuple[str, tuple[int, ...], str, str]] = [
        ("v.patch_embd.weight", (spec.patch_size, spec.patch_size, 3, e), "F16", "weight"),
        ("v.patch_embd.weight.1", (spec.patch_size, spec.patch_size, 3, e), "F16", "weight"),
    ]
    for i in range(spec.n_layer):
        b = f"v.blk.{i}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            rows += [(b + name + ".weight", (e, e), "F16", "weight"), (b + name + ".bias", (e,), "F32", "bias")]
        rows += [(b + "ln1.weight", (e,), "F32", "ones"), (b + "ln2.weight", (e,), "F32", "ones")]
        for name in ("ffn_gate", "ffn_up"):
            rows += [(b + name + ".weight", (e, ff), "F16", "weight"), (b + name + ".bias", (ff,), "F32", "bias")]
        rows += [(b + "ffn_down.weight", (ff, e), "F16", "weight"), (b + "ffn_down.bias", (e,), "F32", "bias")]
    rows += [("v.post_ln.weight", (e,), "F32", "ones"),
             ("mm.0.weight", (merged, merged), "F16", "weight"), ("mm.0.bias", (merged,), "F32", "bias"),
             ("mm.2.weight", (merged, text_n_embd), "F16", "weight"), ("mm.2.bias", (text_n_embd,), "F32", "bias")]
    return rows


def _plan_qwen3vl(spec: ProjectorSpec, text_n_embd: int) -> list[tuple[str, tuple[int, ...], str, str]]:
    """Qwen3-VL's tensors as convert_hf_to_gguf.py names them (clip.cpp, models/qwen3vl.cpp)."""
    e, ff, merged, n_pos = spec.n_embd, spec.n_ff, spec.n_embd * spec.scale * spec.scale, (spec.image_size // spec.patch_size) ** 2
    rows: list[tuple[str, tuple[int, ...], str, str]] = [
        ("v.patch_embd.weight", (spec.patch_size, spec.patch_size, 3, e), "F16", "weight"),
        ("v.patch_embd.weight.1", (spec.patch_size, spec.patch_size, 3, e), "F16", "weight"),
        ("v.patch_embd.bias", (e,), "F32", "bias"),
        ("v.position_embd.weight", (e, n_pos), "F32", "weight"),
    ]
    for i in range(spec.n_layer):
        b = f"v.blk.{i}."
        rows += [(b + "attn_qkv.weight", (e, 3 * e), "F16", "weight"), (b + "attn_qkv.bias", (3 * e,), "F32", "bias"),
                 (b + "attn_out.weight", (e, e), "F16", "weight"), (b + "attn_out.bias", (e,), "F32", "bias"),
                 (b + "ln1.weight", (e,), "F32", "ones"), (b + "ln1.bias", (e,), "F32", "bias"),
                 (b + "ln2.weight", (e,), "F32", "ones"), (b + "ln2.bias", (e,), "F32", "bias"),
                 (b + "ffn_up.weight", (e, ff), "F16", "weight"), (b + "ffn_up.bias", (ff,), "F32", "bias"),
                 (b + "ffn_down.weight", (ff, e), "F16", "weight"), (b + "ffn_down.bias", (e,), "F32", "bias")]
    for i in spec.deepstack:
        d = f"v.deepstack.{i}."
        rows += [(d + "norm.weight", (merged,), "F32", "ones"), (d + "norm.bias", (merged,), "F32", "bias"),
                 (d + "fc1.weight", (merged, merged), "F16", "weight"), (d + "fc1.bias", (merged,), "F32", "bias"),
                 (d + "fc2.weight", (merged, text_n_embd), "F16", "weight"), (d + "fc2.bias", (text_n_embd,), "F32", "bias")]
    rows += [("v.post_ln.weight", (e,), "F32", "ones"), ("v.post_ln.bias", (e,), "F32", "bias"),
             ("mm.0.weight", (merged, merged), "F16", "weight"), ("mm.0.bias", (merged,), "F32", "bias"),
             ("mm.2.weight", (merged, text_n_embd), "F16", "weight"), ("mm.2.bias", (text_n_embd,), "F32", "bias")]
    return rows


def _sized(rows: list[tuple[str, tuple[int, ...], str, str]]) -> list[Any]:
    from .synthetic import PlannedTensor

    out = []
    for name, shape, ttype, fill in rows:
        n = 1
        for d in shape:
            n *= d
        out.append(PlannedTensor(name, shape, ttype, n * (4 if ttype == "F32" else 2), fill))
    return out


def write_projector(path: str | Path, projector: str | ProjectorSpec, text_n_embd: int, *, seed: int = 0) -> Path:
    """Write a random-weight mmproj GGUF for a text model of width ``text_n_embd``; return its path.
    Raises ConfigError (unknown projector, bad width), DiskSpaceError."""
    import gguf
    import numpy as np

    from .synthetic import gguf_writer, write_tensor_data

    spec = projector if isinstance(projector, ProjectorSpec) else projector_spec(projector)
    if text_n_embd < 1:
        raise ConfigError(f"Text width {text_n_embd} must be positive.")
    tensors = plan_projector(spec, text_n_embd)
    total = sum(t.n_bytes for t in tensors)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(out.parent).free < total + (64 << 20):
        raise DiskSpaceError(f"Not enough disk space in {out.parent} for {total / 1e9:.2f} GB.")
    with gguf_writer(out, "clip", gguf) as writer:
        writer.add_name(f"ggufrun synthetic {spec.kind} projector")
        writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
        writer.add_string("clip.projector_type", spec.projector_type)
        writer.add_bool("clip.has_vision_encoder", True)
        writer.add_bool("clip.use_gelu", spec.kind != "qwen25vl")
        if spec.kind == "qwen25vl":
            writer.add_bool("clip.use_silu", True)
            writer.add_uint32("clip.vision.n_wa_pattern", spec.wa_pattern)
        if spec.kind in ("qwen25vl", "qwen3vl"):
            writer.add_uint32("clip.vision.spatial_merge_size", spec.scale)
        writer.add_uint32("clip.vision.embedding_length", spec.n_embd)
        writer.add_uint32("clip.vision.feed_forward_length", spec.n_ff)
        writer.add_uint32("clip.vision.block_count", spec.n_layer)
        writer.add_uint32("clip.vision.projection_dim", text_n_embd)
        writer.add_uint32("clip.vision.attention.head_count", spec.n_head)
        writer.add_float32("clip.vision.attention.layer_norm_epsilon", spec.eps)
        writer.add_uint32("clip.vision.image_size", spec.image_size)
        writer.add_uint32("clip.vision.patch_size", spec.patch_size)
        writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])  # (Qwen's are CLIP's; values do not matter here)
        writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
        if spec.kind not in ("qwen25vl", "qwen3vl"):
            writer.add_uint32("clip.vision.projector.scale_factor", spec.scale)
        if spec.longest_edge:
            writer.add_uint32("clip.vision.preproc_image_size", spec.longest_edge)
        for t in tensors:
            ne = t.shape[::-1]
            writer.add_tensor_info(t.name, ne, np.dtype(np.float32 if t.type == "F32" else np.float16), t.n_bytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        write_tensor_data(writer.fout[0], tensors, seed, writer.data_alignment, total, None, np)
    return out
