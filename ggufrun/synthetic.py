"""Random-weight GGUF models in the exact tensor layout of real architectures.

A synthetic model has a real architecture's shapes, tensor names and quantisation mixture, a
working tokenizer and a chat template, so llama.cpp loads it and runs at the speed the real model
would (speed depends on shapes and tensor types, not on values). Tiny shapes keep tests fast;
full shapes (``qwen2-7b``, ``gemma-2-9b``) let benchmarks measure hardware honestly without a
multi-gigabyte download.

Quantised tensors are written as random but valid ggml blocks (random quant bits, fixed small
f16 scales), not by quantising random floats: that runs at memory speed, so a 4.7 GB
``qwen2-7b`` Q4_K_M file takes seconds, and tensors are streamed one chunk at a time.
Which tensor gets which type follows llama.cpp's ``llama_tensor_get_type`` for the chosen
file type (Q6_K output, Q6_K ``attn_v``/``ffn_down`` on the "use more bits" layers of _M types,
fallbacks for rows that are not a whole number of 256-wide blocks), so file sizes match the
published ones (qwen2-7b: Q4_K_M 4.68 GB, Q5_K_M 5.44 GB).
"""

from __future__ import annotations

import os
import shutil
import stat
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import ConfigError, DiskSpaceError

ARCHES = ("qwen2", "qwen3", "llama", "gemma2", "gemma3", "qwen2vl", "qwen3vl")
MROPE_ARCHES = ("qwen2vl", "qwen3vl")  # Qwen2/2.5-VL's and Qwen3-VL's text models: qwen2's and qwen3's layouts with M-RoPE
_ARCH_ALIASES = {"gemma": "gemma2"}


@dataclass(frozen=True)
class ShapeSpec:
    """The hyperparameters that fix a model's tensor shapes."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    head_dim: int | None = None  # None: n_embd // n_head
    context_length: int = 4096
    tied: bool = True  # no output.weight: the output layer reuses token_embd
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-6
    sliding_window: int = 4096  # gemma2/gemma3 only
    name: str = "custom"
    reranker: bool = False  # qwen3 only: Qwen3-Reranker's rank head (cls.output over "yes"/"no", rank pooling)
    # qwen2vl/qwen3vl: M-RoPE's split of the rotary half-dimensions into (time, height, width,
    # unused); empty: the published share of this head size (Qwen2.5-VL 1/4, 3/8, 3/8; Qwen3-VL 3/8, 5/16, 5/16)
    rope_sections: tuple[int, ...] = ()
    deepstack: int = 0  # qwen3vl: the vision layers whose features are added to the first text layers' (wider image rows)

    def mrope_sections(self) -> tuple[int, int, int, int]:
        """rope.dimension_sections: the given ones, else the published split (16, 24, 24, 0 / 24, 20, 20, 0 at head size 128)."""
        if self.rope_sections:
            a, b, c, d = (list(self.rope_sections) + [0, 0, 0, 0])[:4]
            return a, b, c, d
        half = self.n_embd_head // 2
        t = half // 4 if self.arch == "qwen2vl" else half * 3 // 8
        h = (half - t) // 2
        return t, h, half - t - h, 0

    @property
    def n_embd_head(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


_TINY: dict[str, Any] = dict(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=256, n_vocab=512, context_length=4096)

SHAPES: dict[str, ShapeSpec] = {
    # n_ff = 256 so that ffn_down rows are whole K-quant blocks: tiny K-quant files hold real K blocks
    "tiny": ShapeSpec(arch="qwen2", name="tiny", **_TINY),
    "tiny-llama": ShapeSpec(arch="llama", name="tiny-llama", **_TINY),
    "tiny-gemma": ShapeSpec(arch="gemma2", name="tiny-gemma", sliding_window=512, **_TINY),
    "tiny-gemma3": ShapeSpec(arch="gemma3", name="tiny-gemma3", sliding_window=512, **_TINY),
    "tiny-qwen3": ShapeSpec(arch="qwen3", name="tiny-qwen3", **_TINY),
    # Qwen3-Reranker's shape (tiny and real): llama.cpp scores a (query, document) prompt with its
    # rank pooling, the last token's state through cls.output (the "yes"/"no" rows of the LM head).
    "tiny-qwen3-reranker": ShapeSpec(arch="qwen3", name="tiny-qwen3-reranker", reranker=True, **_TINY),
    "qwen3-reranker-0.6b": ShapeSpec(arch="qwen3", name="qwen3-reranker-0.6b", n_layer=28, n_embd=1024, n_head=16, n_head_kv=8,
                                     head_dim=128, n_ff=3072, n_vocab=151669, context_length=40960, rope_freq_base=1e6,
                                     reranker=True),
    "qwen2-0.5b": ShapeSpec(arch="qwen2", name="qwen2-0.5b", n_layer=24, n_embd=896, n_head=14, n_head_kv=2,
                            n_ff=4864, n_vocab=151936, context_length=32768, rope_freq_base=1e6),
    # Qwen2.5-VL's text model: qwen2's layout with M-RoPE (images get 2-D positions)
    "tiny-qwen2vl": ShapeSpec(arch="qwen2vl", name="tiny-qwen2vl", tied=False, **_TINY),  # untied: a tied random model repeats its last token
    "tiny-qwen3vl": ShapeSpec(arch="qwen3vl", name="tiny-qwen3vl", tied=False, deepstack=1, **_TINY),
    # Qwen3-VL-2B-Instruct's text model (deepstack from 3 vision layers)
    "qwen3-vl-2b": ShapeSpec(arch="qwen3vl", name="qwen3-vl-2b", n_layer=28, n_embd=2048, n_head=16, n_head_kv=8, head_dim=128,
                             n_ff=6144, n_vocab=151936, context_length=262144, rope_freq_base=5e6, deepstack=3),
    "qwen2.5-vl-3b": ShapeSpec(arch="qwen2vl", name="qwen2.5-vl-3b", n_layer=36, n_embd=2048, n_head=16, n_head_kv=2,
                               n_ff=11008, n_vocab=151936, context_length=128000, rope_freq_base=1e6),
    "qwen2-7b": ShapeSpec(arch="qwen2", name="qwen2-7b", n_layer=28, n_embd=3584, n_head=28, n_head_kv=4,
                          n_ff=18944, n_vocab=152064, context_length=32768, tied=False, rope_freq_base=1e6),
    "gemma-2-9b": ShapeSpec(arch="gemma2", name="gemma-2-9b", n_layer=42, n_embd=3584, n_head=16, n_head_kv=8,
                            head_dim=256, n_ff=14336, n_vocab=256000, context_length=8192),
}

# the `arch:key=value,...` keys of an explicit shape -> ShapeSpec fields
_SHAPE_KEYS = {"layers": "n_layer", "dim": "n_embd", "heads": "n_head", "kv_heads": "n_head_kv", "ff": "n_ff",
               "vocab": "n_vocab", "head_dim": "head_dim", "ctx": "context_length", "tied": "tied", "deepstack": "deepstack"}


@dataclass(frozen=True)
class _Quant:
    file_type: str  # gguf.LlamaFileType member name
    default: str  # ggml type of 2-D weights before llama.cpp's per-tensor rules


QUANTS: dict[str, _Quant] = {
    "f32": _Quant("ALL_F32", "F32"),
    "f16": _Quant("MOSTLY_F16", "F16"),
    "q8_0": _Quant("MOSTLY_Q8_0", "Q8_0"),
    "q5_0": _Quant("MOSTLY_Q5_0", "Q5_0"),
    "q4_0": _Quant("MOSTLY_Q4_0", "Q4_0"),
    "q6_k": _Quant("MOSTLY_Q6_K", "Q6_K"),
    "q5_k_m": _Quant("MOSTLY_Q5_K_M", "Q5_K"),
    "q5_k_s": _Quant("MOSTLY_Q5_K_S", "Q5_K"),
    "q4_k_m": _Quant("MOSTLY_Q4_K_M", "Q4_K"),
    "q4_k_s": _Quant("MOSTLY_Q4_K_S", "Q4_K"),
}
_QUANT_ALIASES = {"fp16": "f16", "q4_k": "q4_k_s", "q5_k": "q5_k_s", "q8": "q8_0", "q4": "q4_k_m", "q5": "q5_k_m"}

# Random-but-valid ggml blocks: ggml type -> the f16 fields of a block (byte offset, value); every
# other byte is random quant bits. Scales are chosen so |weight| stays below ~0.05 (layouts from
# ggml-common.h: block_q4_K = d, dmin, scales[12], qs[128]; block_q6_K = ql[128], qh[64],
# scales[16], d; and so on). For K types with a min, dmin ~ mean(scale * q) keeps weights centred.
_AMPLITUDE = 0.05
_BLOCK_SCALES: dict[str, tuple[tuple[int, float], ...]] = {
    "Q4_0": ((0, _AMPLITUDE / 8),),
    "Q5_0": ((0, _AMPLITUDE / 16),),
    "Q5_1": ((0, _AMPLITUDE / 16), (2, -_AMPLITUDE)),
    "Q8_0": ((0, _AMPLITUDE / 127),),
    "Q4_K": ((0, _AMPLITUDE / (63 * 15)), (2, 7.5 * _AMPLITUDE / (63 * 15))),
    "Q5_K": ((0, _AMPLITUDE / (63 * 31)), (2, 15.5 * _AMPLITUDE / (63 * 31))),
    "Q6_K": ((208, _AMPLITUDE / (128 * 32)),),
}
# llama.cpp's tensor_type_fallback for rows that are not a whole number of blocks
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Gemma's turns; a system message is folded into the first user turn, as Gemma 3's template does
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML_TEMPLATE, "gemma": GEMMA_TEMPLATE}

# Qwen3-Reranker's prompt (convert_hf_to_gguf.py writes it as tokenizer.chat_template.rerank) and labels
RERANK_TEMPLATE = (
    '<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct '
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n<Instruct>: Given a web '
    'search query, retrieve relevant passages that answer the query\n<Query>: {query}\n<Document>: {document}'
    '<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n'
)
RERANK_LABELS = ("yes", "no")
# Fill-in-the-middle tokens, after the chat tokens (``fim=``): Qwen2.5-Coder's six (repo-level FIM
# included), or only prefix/suffix/middle (CodeLlama-style names), as tokenizer.ggml.fim_*_token_id.
FIM_TOKENS = {
    "qwen": {"pre": "<|fim_prefix|>", "suf": "<|fim_suffix|>", "mid": "<|fim_middle|>", "pad": "<|fim_pad|>",
             "rep": "<|repo_name|>", "sep": "<|file_sep|>"},
    "basic": {"pre": "<PRE>", "suf": "<SUF>", "mid": "<MID>"},
}

# token ids fixed in every synthetic vocabulary
UNK, BOS, EOS = 0, 1, 2
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>")
_END_OF_TURN = {"chatml": "<|im_end|>", "gemma": "<end_of_turn>"}
_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word"
    " but not what all were we when your can said there use an each which she do how their if will up other"
    " about out many then them these so some her would make like him into time has look two more write go see"
    " number no way could people my than first water been call who oil its now find long down day did get come"
    " made may part hello world model chat assistant user system answer question yes thank please good new"
).split()


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    type: str  # ggml type name
    n_bytes: int
    fill: str  # "weight" | "ones" (norms) | "bias" | "big_bias" (|x| in [1/4, 4)) | "big_norm" (4)


def parse_shape(shape: str | ShapeSpec, arch: str | None = None) -> ShapeSpec:
    """A ShapeSpec from a SHAPES name or ``ARCH:layers=2,dim=64,...``; ``arch`` overrides the
    shape's architecture. Raise ConfigError listing the choices."""
    if isinstance(shape, ShapeSpec):
        spec = shape
    elif shape in SHAPES:
        spec = SHAPES[shape]
    elif ":" in shape:
        spec = _explicit_shape(shape)
    else:
        raise ConfigError(f"Unknown shape '{shape}'.",
                          f"Choose one of: {', '.join(SHAPES)}, or ARCH:layers=N,dim=N,heads=N,kv_heads=N,ff=N,vocab=N.")
    if arch is not None:
        spec = replace(spec, arch=_arch(arch))
    _check(spec)
    return spec


def _arch(name: str) -> str:
    arch = _ARCH_ALIASES.get(name.lower(), name.lower())
    if arch not in ARCHES:
        raise ConfigError(f"Unknown architecture '{name}'.", f"Choose one of: {', '.join(ARCHES)}, gemma.")
    return arch


def _explicit_shape(text: str) -> ShapeSpec:
    arch_text, _, rest = text.partition(":")
    arch = _arch(arch_text)
    values: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if key not in _SHAPE_KEYS or not eq:
            raise ConfigError(f"Bad shape item '{item}' in '{text}'.", f"Keys: {', '.join(_SHAPE_KEYS)}.")
        try:
            values[_SHAPE_KEYS[key]] = bool(int(value)) if key == "tied" else int(value)
        except ValueError:
            raise ConfigError(f"Shape item '{item}' needs an integer value.") from None
    base = {"qwen2": "tiny", "qwen3": "tiny-qwen3", "llama": "tiny-llama", "gemma2": "tiny-gemma", "gemma3": "tiny-gemma3",
            "qwen2vl": "tiny-qwen2vl", "qwen3vl": "tiny-qwen3vl"}[arch]
    return replace(SHAPES[base], name=text, **values)


def _check(spec: ShapeSpec) -> None:
    sizes = ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_vocab", "context_length")
    bad = [n for n in sizes if getattr(spec, n) < 1] + (["head_dim"] if spec.head_dim is not None and spec.head_dim < 1 else [])
    if bad:
        raise ConfigError(f"Shape '{spec.name}': {', '.join(bad)} must be positive.")
    if spec.head_dim is None and spec.n_embd % spec.n_head:
        raise ConfigError(f"Shape '{spec.name}': dim {spec.n_embd} is not a multiple of heads {spec.n_head}.")
    if spec.arch in ("qwen2", "llama", "qwen2vl") and spec.head_dim not in (None, spec.n_embd // spec.n_head):
        raise ConfigError(f"Shape '{spec.name}': {spec.arch} needs head_dim = dim / heads.")
    if spec.arch in MROPE_ARCHES and (sum(spec.mrope_sections()) != spec.n_embd_head // 2 or min(spec.mrope_sections()) < 0):
        raise ConfigError(f"Shape '{spec.name}': rope sections {spec.mrope_sections()} must add up to half the head size.")
    if spec.deepstack and (spec.arch != "qwen3vl" or not 0 < spec.deepstack <= spec.n_layer):
        raise ConfigError(f"Shape '{spec.name}': deepstack (Qwen3-VL) needs a qwen3vl shape and at most {spec.n_layer} layers.")
    if spec.reranker and spec.arch != "qwen3":
        raise ConfigError(f"Shape '{spec.name}': only qwen3 shapes have a reranker head (Qwen3-Reranker).")
    if spec.n_head % spec.n_head_kv:
        raise ConfigError(f"Shape '{spec.name}': heads {spec.n_head} is not a multiple of kv_heads {spec.n_head_kv}.")
    if spec.arch == "gemma2" and not spec.tied:
        raise ConfigError(f"Shape '{spec.name}': gemma2 always ties its output layer to the embedding.")
    minimum = 3 + len(CHAT_TOKENS) + 256
    if spec.n_vocab < minimum:
        raise ConfigError(f"Shape '{spec.name}': vocab {spec.n_vocab} is too small (at least {minimum}).")


def writes(quant: str) -> bool:
    """Whether write_synthetic writes ``quant`` itself (short forms such as q4 and fp16 accepted)."""
    return _QUANT_ALIASES.get(quant.lower(), quant.lower()) in QUANTS


def _quant(name: str) -> str:
    key = _QUANT_ALIASES.get(name.lower(), name.lower())
    if key not in QUANTS:
        raise ConfigError(f"Unknown quant '{name}'.", f"Choose one of: {', '.join(QUANTS)}.")
    return key


def _use_more_bits(i_layer: int, n_layer: int) -> bool:
    # llama.cpp: the first and last eighth of the layers, and every third one in between
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _weight_type(name: str, row: int, layer: int | None, spec: ShapeSpec, quant: str) -> str:
    """The ggml type llama.cpp's quantiser gives a 2-D weight under file type ``quant``."""
    q = QUANTS[quant]
    new = q.default
    if new in ("F32", "F16"):
        return new
    if name == "output.weight" or (spec.tied and name == "token_embd.weight"):
        new = "Q8_0" if row % 256 or new == "Q8_0" else "Q6_K"
    elif layer is not None and name.endswith(("attn_v.weight", "ffn_down.weight")):
        if quant in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, spec.n_layer):
            new = "Q6_K"
        elif quant == "q4_k_s" and (layer < 4 if "attn_v" in name else layer < spec.n_layer // 8):
            new = "Q5_K"
    block = 256 if new.endswith("_K") else 32
    if row % block:
        new = _FALLBACK.get(new, new)
    return "F16" if row % 32 else new


def _layout(spec: ShapeSpec) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, ggml shape, fill) for every tensor llama.cpp's loader expects for this arch."""
    e, hd, v = spec.n_embd, spec.n_embd_head, spec.n_vocab
    q_dim, kv_dim = spec.n_head * hd, spec.n_head_kv * hd
    yield "token_embd.weight", (e, v), "weight"
    gemma = spec.arch in ("gemma2", "gemma3")
    for i in range(spec.n_layer):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (e,), "ones"
        yield b + "attn_q.weight", (e, q_dim), "weight"
        yield b + "attn_k.weight", (e, kv_dim), "weight"
        yield b + "attn_v.weight", (e, kv_dim), "weight"
        if spec.arch in ("qwen2", "qwen2vl"):
            # qwen2vl: large query/key biases, as real Qwen2 models have, make attention sharp and so its
            # replies depend on positions (with small random ones attention is near uniform, and an
            # image's positions could be wrong without a greedy reply changing)
            big = "big_bias" if spec.arch == "qwen2vl" else "bias"
            yield b + "attn_q.bias", (q_dim,), big
            yield b + "attn_k.bias", (kv_dim,), big
            yield b + "attn_v.bias", (kv_dim,), "bias"
        if spec.arch in ("gemma3", "qwen3", "qwen3vl"):
            # qwen3vl: large query/key norms make attention sharp (as qwen2vl's biases do)
            sharp = "big_norm" if spec.arch == "qwen3vl" else "ones"
            yield b + "attn_q_norm.weight", (hd,), sharp
            yield b + "attn_k_norm.weight", (hd,), sharp
        yield b + "attn_output.weight", (q_dim, e), "weight"
        if gemma:
            yield b + "post_attention_norm.weight", (e,), "ones"
        yield b + "ffn_norm.weight", (e,), "ones"
        yield b + "ffn_gate.weight", (e, spec.n_ff), "weight"
        yield b + "ffn_up.weight", (e, spec.n_ff), "weight"
        yield b + "ffn_down.weight", (spec.n_ff, e), "weight"
        if gemma:
            yield b + "post_ffw_norm.weight", (e,), "ones"
    yield "output_norm.weight", (e,), "ones"
    if not spec.tied:
        yield "output.weight", (e, v), "weight"
    if spec.reranker:
        yield "cls.output.weight", (e, len(RERANK_LABELS)), "weight"


def plan(shape: str | ShapeSpec = "tiny", arch: str | None = None, quant: str = "q8_0") -> list[PlannedTensor]:
    """The tensors a synthetic file will hold, with their types and sizes; raise ConfigError."""
    import gguf

    spec, quant = parse_shape(shape, arch), _quant(quant)
    out = []
    for name, shape_, fill in _layout(spec):
        if fill == "weight":
            parts = name.split(".")
            layer = int(parts[1]) if parts[0] == "blk" else None
            ttype = _weight_type(name, shape_[0], layer, spec, quant)
        else:
            ttype = "F32"  # norms and biases stay f32, as llama.cpp's quantiser leaves them
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ttype]]
        n = 1
        for d in shape_:
            n *= d
        out.append(PlannedTensor(name, shape_, ttype, n // block * type_size, fill))
    return out


def build_vocab(n_vocab: int, family: str, extra: tuple[str, ...] = ()) -> tuple[list[str], list[float], list[int], dict[str, int]]:
    """An SPM ("llama") vocabulary of exactly ``n_vocab`` tokens: <unk> <s> </s>, the chat
    control tokens, 256 byte-fallback tokens (so any text tokenizes), English words with every
    prefix (so SPM's pairwise merges can reach them), and pronounceable filler.

    ``extra`` control tokens (FIM's, a vision projector's image markers) follow the chat tokens.

    Returns tokens, scores, token types and the special ids (bos, eos, unk, eot)."""
    from gguf import TokenType

    tokens = ["<unk>", "<s>", "</s>", *CHAT_TOKENS, *extra]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.CONTROL] * (len(CHAT_TOKENS) + len(extra))
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    scores = [0.0] * len(tokens)
    pieces = _pieces(n_vocab - len(tokens))
    tokens += pieces
    types += [TokenType.NORMAL] * len(pieces)
    scores += [-float(i) for i in range(len(pieces))]  # earlier pieces merge first
    eot = tokens.index(_END_OF_TURN[family])
    ids = {"bos": BOS, "eos": eot, "unk": UNK, "eot": eot}
    return tokens, scores, [int(t) for t in types], ids


def _pieces(count: int) -> list[str]:
    seen: dict[str, None] = {}
    for ch in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'":
        seen[ch] = None
    for word in _WORDS:
        for prefix in (f"▁{word}", word):
            for end in range(2, len(prefix) + 1):
                seen[prefix[:end]] = None
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]
    n = 1
    while len(seen) < count:
        # n-syllable words, with and without the word-start marker, until the vocabulary is full
        for idx in range(len(syllables) ** n):
            word = ""
            for _ in range(n):
                idx, r = divmod(idx, len(syllables))
                word += syllables[r]
            seen.setdefault("▁" + word, None)
            seen.setdefault(word, None)
            if len(seen) >= count:
                break
        n += 1
    return list(seen)[:count]


def write_synthetic(
    path: str | Path,
    shape: str | ShapeSpec = "tiny",
    arch: str | None = None,
    quant: str = "q8_0",
    seed: int = 0,
    chat_template: bool | str = True,
    vocab_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = True,
    inert: bool = False,
    layers: int | None = None,
    perturb: float = 0.0,
    fim: str | None = None,
    extra_tokens: tuple[str, ...] = (),
) -> Path:
    """Write a random-weight GGUF to ``path`` (atomically) and return the path.

    ``shape``: a SHAPES name, ``ARCH:layers=N,dim=N,...`` or a ShapeSpec; ``arch`` overrides its
    architecture (qwen2, llama, gemma/gemma2, gemma3); ``quant``: one of QUANTS.
    ``chat_template``: True writes the family's template (chatml for qwen2/llama, gemma turns for
    gemma), False none, a string that template. ``progress(done_bytes, total_bytes)`` is called
    as tensor data is written. Deterministic for a given seed. With ``overwrite=False`` an
    existing file is left alone. ``fim``: "qwen" or "basic" adds fill-in-the-middle tokens (FIM_TOKENS).
    A reranker shape also gets Qwen3-Reranker's rerank template and labels, and rank pooling.
    ``extra_tokens``: control tokens added to the vocabulary (the image markers a vision
    projector looks up, synthetic_vision.VISION_TOKENS).
    Raises ConfigError for a bad shape or quant or an existing file (overwrite=False),
    DiskSpaceError when the disk is too small.

    Target/draft pairs for speculative decoding (random weights never agree otherwise): ``inert``
    zeroes every layer's attention output and FFN down projection, so the layers add nothing to the
    residual stream and the next token depends on the last token alone, through the embedding and
    output matrices, which are drawn from ``seed`` and the tensor's name only. Two inert files of
    the same shape but for ``layers`` (a cheap draft: ``layers=1``) and the same seed then predict
    the same next token; ``perturb`` (0..1) draws that share of the output matrix's rows anew, so
    the draft disagrees on about that share of tokens (1: a draft that is never right).
    """
    import gguf
    import numpy as np

    spec = parse_shape(shape, arch)
    if vocab_size is not None or layers is not None:
        spec = replace(spec, n_vocab=vocab_size or spec.n_vocab, n_layer=layers or spec.n_layer)
        _check(spec)
    if not 0.0 <= perturb <= 1.0 or (perturb and not inert):
        raise ConfigError(f"perturb={perturb}: give a share between 0 and 1, with an inert model.")
    if inert and spec.tied:  # tied, an inert model's best next token is the last one: every draft agrees
        raise ConfigError(f"An inert model needs its own output matrix; shape {spec.name} ties it to the embedding.",
                          "Use qwen2-7b, or add tied=0 to an ARCH:... shape.")
    quant = _quant(quant)
    if inert and quant in ("f16", "f32"):  # the shared matrices are drawn block by block, as quantized blocks
        raise ConfigError(f"An inert pair needs a quantized type; {quant} would give the draft other matrices, so it never agrees.",
                          "Use --quant q8_0 or another quantized type.")
    if fim is not None and fim not in FIM_TOKENS:
        raise ConfigError(f"Unknown FIM token set '{fim}'.", f"Choose one of: {', '.join(FIM_TOKENS)}.")
    tensors = plan(spec, quant=quant)
    total = sum(t.n_bytes for t in tensors)
    out = Path(path)
    try:
        mode = os.lstat(out).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise ConfigError(f"Cannot write {out}: {exc.strerror}.") from None
    # The file is written next to OUT and renamed over it: a device, FIFO or symlink there would be
    # replaced by a regular file (`--out /dev/full --force` did that), so only regular files are replaced.
    if mode is not None and not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise ConfigError(f"{out} is {kind}; synth writes only new or regular files.", "Choose another --out path.")
    if mode is not None and not overwrite:
        raise ConfigError(f"{out} already exists.", "Choose another path, or allow replacing it (--force).")
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < total + (64 << 20):
        raise DiskSpaceError(f"Not enough disk space in {out.parent} for {total / 1e9:.2f} GB "
                             f"({free / 1e9:.2f} GB free).")
    template = TEMPLATES["gemma" if spec.arch.startswith("gemma") else "chatml"] if chat_template is True else (
        chat_template or None)
    from .gguf_info import template_family

    family = template_family(template)
    family = family if family in TEMPLATES else ("gemma" if spec.arch.startswith("gemma") else "chatml")

    with gguf_writer(out, spec.arch, gguf) as writer:
        _write_metadata(writer, spec, quant, family, template, gguf, fim, extra_tokens)
        for t in tensors:
            ne = t.shape[::-1]  # numpy order
            if t.type in ("F32", "F16"):
                writer.add_tensor_info(t.name, ne, np.dtype(np.float32 if t.type == "F32" else np.float16), t.n_bytes)
            else:
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.type]]
                byte_shape = (*ne[:-1], ne[-1] // block * type_size)
                writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.n_bytes,
                                       raw_dtype=gguf.GGMLQuantizationType[t.type])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        write_tensor_data(writer.fout[0], tensors, seed, writer.data_alignment, total, progress, np,
                          inert=inert, perturb=perturb)
    return out


@contextmanager
def gguf_writer(out: Path, arch: str, gguf: Any) -> Iterator[Any]:
    """A GGUFWriter onto a temporary file beside ``out``, renamed over ``out`` when the block ends
    without an error: a failed or interrupted write leaves no partial file and ``out`` as it was."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        yield writer
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)


def _write_metadata(w: Any, spec: ShapeSpec, quant: str, family: str, template: str | None, gguf: Any,
                    fim: str | None = None, extra_tokens: tuple[str, ...] = ()) -> None:
    w.add_name(f"ggufrun synthetic {spec.name} {quant}")
    w.add_file_type(int(gguf.LlamaFileType[QUANTS[quant].file_type]))
    if quant not in ("f32", "f16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_layer_norm_rms_eps(spec.rms_eps)
    w.add_rope_freq_base(spec.rope_freq_base)
    if spec.arch == "llama":
        w.add_rope_dimension_count(spec.n_embd_head)
        w.add_vocab_size(spec.n_vocab)
    if spec.arch in ("gemma2", "gemma3", "qwen3", "qwen3vl"):
        w.add_key_length(spec.n_embd_head)
        w.add_value_length(spec.n_embd_head)
        if spec.arch not in ("qwen3", "qwen3vl"):
            w.add_sliding_window(spec.sliding_window)
    if spec.arch in MROPE_ARCHES:
        w.add_array(f"{spec.arch}.rope.dimension_sections", list(spec.mrope_sections()))
    if spec.deepstack:
        w.add_uint32(f"{spec.arch}.n_deepstack_layers", spec.deepstack)
    if spec.arch == "gemma2":
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
    fim_names = FIM_TOKENS[fim] if fim else {}
    tokens, scores, types, ids = build_vocab(spec.n_vocab, family, tuple(fim_names.values()) + tuple(extra_tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(ids["bos"])
    w.add_eos_token_id(ids["eos"])
    w.add_eot_token_id(ids["eot"])
    w.add_unk_token_id(ids["unk"])
    w.add_pad_token_id(ids["unk"])
    for role, text in fim_names.items():
        w.add_uint32(getattr(gguf.Keys.Tokenizer, f"FIM_{role.upper()}_ID"), tokens.index(text))
    w.add_add_bos_token(spec.arch not in ("qwen2", "qwen3", "qwen2vl", "qwen3vl"))  # Qwen adds no BOS; llama and gemma do
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)  # so that text round-trips through tokenize/detokenize unchanged
    if spec.reranker:
        w.add_pooling_type(gguf.PoolingType.RANK)
        w.add_classifier_output_labels(list(RERANK_LABELS))
        w.add_chat_template([*([{"name": "default", "template": template}] if template else []),
                             {"name": "rerank", "template": RERANK_TEMPLATE}])
    elif template:
        w.add_chat_template(template)


_CHUNK = 64 << 20  # bytes of random data generated at a time


_SHARED = ("token_embd.weight", "output.weight")  # an inert pair's common matrices
_ZERO = (".attn_output.weight", ".ffn_down.weight")  # zero in an inert model: its layers add nothing


def write_tensor_data(fout: Any, tensors: list[PlannedTensor], seed: int, alignment: int, total: int,
                      progress: Callable[[int, int], None] | None, np: Any, *, inert: bool = False,
                      perturb: float = 0.0) -> None:
    """Stream the tensors' random data into an open GGUF file after its header (synthetic_vision too)."""
    import gguf

    noise = _Noise(seed, min(_CHUNK, total), np)
    done = 0
    for t in tensors:
        fout.write(b"\0" * (-fout.tell() % alignment))
        if inert and t.name.endswith(_ZERO):
            for start in range(0, t.n_bytes, _CHUNK):
                fout.write(bytes(min(_CHUNK, t.n_bytes - start)))
        elif inert and t.name in _SHARED and t.type not in ("F32", "F16"):
            _write_shared(fout, t, seed, perturb if t.name == "output.weight" else 0.0, np)
        elif t.fill == "ones":
            np.ones(t.n_bytes // 4, dtype=np.float32).tofile(fout)
        elif t.fill == "big_norm":
            np.full(t.n_bytes // 4, 4.0, dtype=np.float32).tofile(fout)
        elif t.fill == "big_bias":
            (_random_f16(noise.bytes(t.n_bytes // 2), np).astype(np.float32) * 64).tofile(fout)
        elif t.type in ("F32", "F16"):
            n = t.n_bytes // (4 if t.type == "F32" else 2)
            for start in range(0, n, _CHUNK // 2):
                values = _random_f16(noise.bytes(2 * min(_CHUNK // 2, n - start)), np)
                (values.astype(np.float32) if t.type == "F32" else values).tofile(fout)
        else:
            type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.type]][1]
            n_blocks = t.n_bytes // type_size
            per_chunk = max(1, _CHUNK // type_size)
            for start in range(0, n_blocks, per_chunk):
                count = min(per_chunk, n_blocks - start)
                _set_block_scales(noise.bytes(count * type_size).reshape(count, type_size), t.type, np).tofile(fout)
        done += t.n_bytes
        if progress is not None:
            progress(done, total)


def _write_shared(fout: Any, t: PlannedTensor, seed: int, perturb: float, np: Any) -> None:
    """A shared matrix of an inert pair: its blocks from (seed, name) alone, in fixed chunks, so
    files of other depths hold the same bytes; ``perturb``: that share of rows drawn anew."""
    import zlib

    import gguf

    type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.type]][1]
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.type]][0]
    per_row = t.shape[0] // block
    n_blocks = t.n_bytes // type_size
    key = zlib.crc32(t.name.encode())
    same, other = _Noise((seed, key), 1 << 24, np), _Noise((seed, key, 1), 1 << 24, np)
    redraw = np.random.default_rng((seed, key, 2)).random(n_blocks // per_row) < perturb
    rows_per_chunk = max(1, (_CHUNK // type_size) // per_row)
    for row0 in range(0, n_blocks // per_row, rows_per_chunk):
        rows = min(rows_per_chunk, n_blocks // per_row - row0)
        blocks = _set_block_scales(same.bytes(rows * per_row * type_size).reshape(rows * per_row, type_size), t.type, np)
        picked = redraw[row0 : row0 + rows]
        if picked.any():
            fresh = _set_block_scales(other.bytes(rows * per_row * type_size).reshape(rows * per_row, type_size), t.type, np)
            mask = np.repeat(picked, per_row)
            blocks[mask] = fresh[mask]
        blocks.tofile(fout)


class _Noise:
    """Deterministic random bytes at memory speed: one random pool, XOR-ed with a fresh random
    word per call (generating every byte with numpy's RNG made a 5 GB file CPU-bound)."""

    def __init__(self, seed: int | tuple[int, ...], size: int, np: Any) -> None:
        self.np = np
        self.rng = np.random.default_rng(seed)
        self.pool = self._words(-(-size // 8))

    def _words(self, n: int | None) -> Any:
        return self.rng.integers(0, 2**64 - 1, n, dtype=self.np.uint64, endpoint=True)

    def bytes(self, n: int) -> Any:
        words = -(-n // 8)
        if words > len(self.pool):
            self.pool = self._words(words)
        return (self.pool[:words] ^ self._words(None)).view(self.np.uint8)[:n]


def _random_f16(raw: Any, np: Any) -> Any:
    """Random f16 values with |x| in [2^-8, 2^-4): random sign and mantissa, exponent 7..10."""
    bits = raw.view(np.uint16)
    bits = (bits & 0x83FF) | ((7 + ((bits >> 10) & 3)) << 10).astype(np.uint16)
    return bits.view(np.float16)


def _set_block_scales(blocks: Any, ttype: str, np: Any) -> Any:
    """Overwrite the f16 scale fields of random blocks with the type's small, finite scales."""
    for offset, value in _BLOCK_SCALES[ttype]:
        lo, hi = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
        blocks[:, offset] = lo
        blocks[:, offset + 1] = hi
    return blocks
