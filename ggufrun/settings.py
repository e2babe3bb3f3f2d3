"""The one settings model shared by chat, serve and bench, and the one place layers are merged.

Merge order, lowest first (a later layer wins for every key it sets):

1. the built-in defaults below (``Settings()``),
2. the registry entry's ``defaults`` table in models.toml,
3. the ``[defaults]`` table of ``$GGUFRUN_HOME/config.toml``,
4. environment variables ``GGUFRUN_<FIELD>`` (``GGUFRUN_N_CTX=8192``),
5. the command line (or, in the server, a model's table in the serve config).

Values from every layer go through :func:`coerce`, so a bad value gets the same one-line error
whether it came from a flag, a TOML file or the environment. This module stays free of heavy
imports: the CLI builds its flags from :data:`FIELDS` at start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError


@dataclass(frozen=True)
class Field:
    """Bounds and help for one setting; the CLI flag is ``--name-with-dashes``."""

    name: str
    type: type
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    sampling: bool = False
    auto: bool = False  # also accepts the word "auto"
    short: str = ""  # llama.cpp's short flag, where people know it (-ctk)


# The KV cache types llama.cpp's -ctk/-ctv accept (common/arg.cpp kv_cache_types), and each one's bytes
# per element: a quantized type stores a block of 32 elements in the bytes given (ggml's block_q8_0 etc).
KV_CACHE_BYTES: dict[str, float] = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                                    "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32}
KV_CACHE_TYPES = tuple(KV_CACHE_BYTES)

FIELDS: dict[str, Field] = {f.name: f for f in (
    Field("n_gpu_layers", int, "Layers to offload to the GPU: auto (as many as fit in free GPU memory), -1 = all, 0 = CPU only.",
          min=-1, auto=True),
    Field("n_ctx", int, "Context window in tokens (0 = the model's trained length).", min=0),
    Field("flash_attn", str, "Flash attention.", choices=("on", "off", "auto")),
    Field("cache_type_k", str, "KV cache type of the keys (llama.cpp -ctk): f16, or q8_0/q4_0... for less memory.",
          choices=KV_CACHE_TYPES, short="-ctk"),
    Field("cache_type_v", str, "KV cache type of the values (llama.cpp -ctv); a quantized one needs flash attention.",
          choices=KV_CACHE_TYPES, short="-ctv"),
    Field("threads", int, "CPU threads for generation (0 = number of physical cores).", min=0, max=1024),
    Field("batch_size", int, "Prompt processing batch size (logical, llama.cpp -b).", min=1),
    Field("ubatch_size", int, "Physical micro-batch size (llama.cpp -ub).", min=1),
    Field("seed", int, "Sampling seed (-1 = random).", min=-1, max=2**32 - 2),  # llama.cpp's seed is uint32; 2**32-1 means random
    Field("temperature", float, "Sampling temperature (0 = greedy).", min=0.0, max=100.0, sampling=True),
    Field("top_p", float, "Nucleus sampling threshold.", min=0.0, max=1.0, sampling=True),
    Field("top_k", int, "Top-k sampling (0 = off).", min=0, sampling=True),
    Field("min_p", float, "Min-p sampling threshold.", min=0.0, max=1.0, sampling=True),
    # llama.cpp divides positive logits by it: 0 would divide by zero
    Field("repeat_penalty", float, "Penalty for repeating recent tokens (1.0 = off).", min=0.01, max=10.0, sampling=True),
    Field("presence_penalty", float, "Subtract this from every token already in the recent window (0 = off).", min=-2.0, max=2.0, sampling=True),
    Field("frequency_penalty", float, "Subtract this times a token's count in the recent window (0 = off).", min=-2.0, max=2.0, sampling=True),
    Field("repeat_last_n", int, "Tokens the penalties look back over, prompt included (-1 = the whole context, 0 = off).", min=-1, sampling=True),
    Field("max_tokens", int, "Most tokens to generate per reply (0 = until end of turn or context).", min=0, sampling=True),
    Field("template", str, "Chat template: auto (the GGUF's own, else the family's) or chatml, gemma, llama3, plain."),
    Field("reasoning_format", str, "Thinking of reasoning models: auto (from the chat template), none (leave it in the answer) "
          "or deepseek (<think>...</think>).", choices=("auto", "none", "deepseek")),
    Field("reasoning_budget", int, "Most thinking tokens per reply before the block is closed and the answer follows "
          "(-1 = no limit, 0 = thinking off).", min=-1),
    Field("rpc", str, "RPC workers HOST:PORT,... (ggufrun rpc-worker) whose devices llama.cpp offloads layers to."),
    Field("split_mode", str, "How layers spread over several devices.", choices=("layer", "row", "none")),
    Field("tensor_split", str, "Each device's share of the model, e.g. 3,1 (default: by free memory)."),
    Field("main_gpu", int, "The device used with --split-mode none (its index among the devices).", min=0),
    Field("spec", str, "Speculative decoding without a second model: ngram (continue an earlier occurrence of the "
          "last tokens in the prompt or reply), or off.", choices=("off", "ngram")),
    Field("draft_model", str, "Speculative decoding with this small model of the same vocabulary drafting "
          "(any name ggufrun resolves; empty = none)."),
    Field("draft_max", int, "Most tokens drafted per step (speculative decoding).", min=1, max=64),
    Field("draft_min", int, "Fewest draft tokens worth checking; a shorter draft is not used.", min=0, max=64),
    Field("draft_p_min", float, "A draft model stops drafting at a token it gives less than this probability.", min=0.0, max=1.0),
    Field("mmproj", str, "A vision projector (mmproj GGUF) for the model, in place of the one fetched with it: images in chat and serve."),
    Field("image_encoders", int, "Pictures encoded at once, each by its own copy of the vision projector: auto (1 on a "
          "CPU, whose threads one encode already uses; more on a GPU, which one encode leaves mostly idle) or a count "
          "(on a GPU; a CPU loads one and says so).",
          min=1, max=16, auto=True),
    Field("step_tokens", int, "serve: prompt and embedding work one engine step takes beside generating replies: auto "
          "(a time per step, from each kind's measured cost: steps within 1.2x a plain decode step on average beside "
          "prompts, 1.3x beside texts to embed; a short prompt, or any but a long one while more prompts wait than replies "
          "generate, is read whole at once) or a fixed count of tokens.", min=1, auto=True),
)}


@dataclass(frozen=True)
class Settings:
    """Runtime and sampling settings, already validated. ggufrun's own defaults are stated here."""

    n_gpu_layers: int | str = "auto"  # "auto" is resolved against the model and the GPUs before loading
    n_ctx: int = 4096
    flash_attn: str = "auto"
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    threads: int = 0
    batch_size: int = 512
    ubatch_size: int = 512
    seed: int = -1
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = 64
    max_tokens: int = 0
    template: str = "auto"
    reasoning_format: str = "auto"
    reasoning_budget: int = -1
    rpc: str = ""
    split_mode: str = "layer"
    tensor_split: str = ""
    main_gpu: int = 0
    spec: str = "off"
    draft_model: str = ""
    draft_max: int = 16
    draft_min: int = 0
    draft_p_min: float = 0.75  # llama-server's --draft-p-min
    mmproj: str = ""
    image_encoders: int | str = "auto"  # resolved in vision.load_projector
    step_tokens: int | str = "auto"  # the engine's per-step budget (server/budget.py)

    def updated(self, layer: Mapping[str, Any], origin: str) -> "Settings":
        """A copy with the non-None values of ``layer`` applied, validated."""
        changes = {}
        for key, raw in layer.items():
            if raw is None:
                continue
            changes[key] = coerce(key, raw, origin)
        return replace(self, **changes)

    def sampling(self, *, seed: bool = False) -> dict[str, Any]:
        """The sampling fields (a request's defaults); with ``seed``, the seed too."""
        out = {name: getattr(self, name) for name, f in FIELDS.items() if f.sampling}
        if seed:
            out["seed"] = self.seed
        return out

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def effective_threads(self) -> int:
        return self.threads or physical_cores()


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except Exception:  # psutil can fail inside odd containers; the logical count is a fair guess
        return os.cpu_count() or 1


def coerce(key: str, raw: Any, origin: str = "settings") -> Any:
    """Convert and bound-check one value; raise ConfigError naming the key, value and origin."""
    field = FIELDS.get(key)
    if field is None:
        raise ConfigError(f"Unknown setting '{key}' in {origin}.", f"Known settings: {', '.join(FIELDS)}.")
    if field.auto and isinstance(raw, str) and raw.strip().lower() == "auto":
        return "auto"
    try:
        if field.type is bool:
            value: Any = raw if isinstance(raw, bool) else str(raw).lower() in {"1", "true", "yes", "on"}
        elif field.type is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            value = int(raw)
        elif field.type is float:
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw)
        else:
            value = str(raw).strip()
            if field.choices:
                value = value.lower()
    except (TypeError, ValueError):
        expected = f"{field.type.__name__} or auto" if field.auto else field.type.__name__
        raise ConfigError(f"Invalid {key}={raw!r} in {origin}: expected {expected}.") from None
    if field.type is float and value != value:  # NaN passes every comparison below
        raise ConfigError(f"Invalid {key}={raw!r} in {origin}: not a number.")
    if field.min is not None and value < field.min:
        raise ConfigError(f"Invalid {key}={raw!r} in {origin}: must be >= {_num(field.min)}.")
    if field.max is not None and value > field.max:
        raise ConfigError(f"Invalid {key}={raw!r} in {origin}: must be <= {_num(field.max)}.")
    if field.choices and value not in field.choices:
        raise ConfigError(f"Invalid {key}={raw!r} in {origin}: choose one of {', '.join(field.choices)}.")
    if key in ("rpc", "tensor_split") and value:
        from . import distributed

        value = ",".join(distributed.parse_endpoints(value, origin)) if key == "rpc" else value.replace(" ", "")
        if key == "tensor_split":
            distributed.parse_tensor_split(value, origin)
    return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def read_config(path: Path) -> dict[str, Any]:
    """The ``[defaults]`` table of a config.toml (empty when the file does not exist)."""
    if not path.exists():
        return {}
    data = load_toml(path)
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: [defaults] must be a table.")
    return defaults


def load_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; a syntax error names the file and line."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    from .textfile import read_text

    text = read_text(path, "TOML file")  # a FIFO, device, huge or binary file: one-line ConfigError
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}.") from None
    except RecursionError:
        raise ConfigError(f"{path}: arrays or tables nested too deeply.") from None


def from_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    return {name: env[f"GGUFRUN_{name.upper()}"] for name in FIELDS if f"GGUFRUN_{name.upper()}" in env}


def resolve(
    entry_defaults: Mapping[str, Any] | None = None,
    cli: Mapping[str, Any] | None = None,
    *,
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge every layer in the documented order into one validated Settings."""
    from . import paths

    cfg_path = config_path or paths.config_file()
    settings = Settings()
    settings = settings.updated(entry_defaults or {}, "models.toml")
    settings = settings.updated(read_config(cfg_path), str(cfg_path))
    settings = settings.updated(from_env(environ), "environment")
    settings = settings.updated(cli or {}, "command line")
    return settings
