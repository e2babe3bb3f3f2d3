"""How long a served model stays loaded, and whether another fits beside it.

* **keep_alive**, as Ollama: every model has one, the server's ``--keep-alive`` (default 5m, as
  OLLAMA_KEEP_ALIVE) until an Ollama request brings its own; a model idle for that long is
  unloaded. 0 unloads it as soon as its running requests end; a negative one keeps it loaded.
  "Idle" starts when its last request (or embedding, or a handler holding a lease) ends:
  :meth:`Residency.touch` is called on every acquire and release and by the reaper while it
  is busy, so an unload never frees a model a request uses (the pool's eviction checks
  ``Engine.busy()``, which counts leases, queued and running jobs).
* **Memory**: each resident model's estimate (gguf_info.memory_estimate, what ``ggufrun show``
  prints, for the cells its KV cache really has and the layers really offloaded) is kept; a new
  model loads only when its estimate fits beside them in what the devices reported before the
  first load (RAM available, each GPU's free memory less offload's margin) and in what they
  report now. Otherwise the least recently used idle models are unloaded first; ``--max-loaded``
  stays a cap on the count.
"""

from __future__ import annotations

import datetime
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..gguf_info import MemoryEstimate

log = logging.getLogger("ggufrun.server")

DEFAULT_KEEP_ALIVE = 300.0  # seconds: Ollama's default (OLLAMA_KEEP_ALIVE=5m)
REAP_SECONDS = 0.25  # how often idle models are checked: keep_alive 0 unloads within this of the reply's end
# Past this a duration is "forever" (Go's time.Duration tops out at 292 years; Ollama's ps then shows 2318).
FOREVER_SECONDS = (2**63 - 1) / 1e9
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


class KeepAliveError(ValueError):
    """A keep_alive value that is neither a duration nor a number of seconds."""


def parse_keep_alive(value: Any, what: str = "keep_alive") -> float | None:
    """Seconds to keep a model loaded after its last request; None: forever.

    Accepts what Ollama accepts: a number of seconds (negative: forever), or a Go duration
    string ("5m", "1h30m", "0", "-1s"), plus a bare number in a string ("300", "-1") as seconds.
    Raises KeepAliveError naming ``what``."""
    if isinstance(value, bool) or value is None:
        raise KeepAliveError(f"'{what}' must be a duration such as \"5m\", \"1h\" or \"30s\", or a number of seconds "
                             f"(got {value!r}).")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an integer past any float (JSON allows it): as long as keep_alive gets
            seconds = math.inf if value > 0 else -math.inf
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text[1:] if text[:1] in ("+", "-") else text
        try:
            seconds = sign * float(body) if body and re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", body) else math.nan
        except ValueError:
            seconds = math.nan
        if math.isnan(seconds):
            parts = _PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise KeepAliveError(f"'{what}' must be a duration such as \"5m\", \"1h\" or \"30s\", or a number of "
                                     f"seconds (got {value!r}).")
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise KeepAliveError(f"'{what}' must be a duration string or a number of seconds (got {type(value).__name__}).")
    if math.isnan(seconds):
        raise KeepAliveError(f"'{what}' must be a number of seconds, not NaN.")
    if seconds < 0 or seconds >= FOREVER_SECONDS:
        return None
    return seconds


def format_keep_alive(seconds: float | None) -> str:
    """"5m", "30s", "forever": how a keep_alive reads in logs and messages."""
    if seconds is None:
        return "forever"
    if seconds and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def request_context(served: int, asked: int | None, model: str) -> int:
    """The context (prompt + reply, in tokens) one request gets: the served one, or less when it
    asks for less (Ollama's options.num_ctx). More than the model was loaded with is a 400: the
    KV cache of a loaded model cannot grow (``serve --max-num-ctx`` lets such a request reload it
    first: ModelPool.fit_context)."""
    from .api_errors import ApiError

    if asked is None:
        return served
    if asked > served:
        raise ApiError(400, f"'options.num_ctx' is {asked}, but model '{model}' is served with {served} tokens per request: "
                            f"send num_ctx {served} or less, or restart the server with --n-ctx {asked} (or --max-num-ctx "
                            f"{asked}, to reload the model for such a request).", param="num_ctx")
    return asked


def check_embed_context(texts: list[list[int]], n_ctx: int) -> None:
    """Refuse a text longer than the request's num_ctx (Ollama would cut it; ggufrun never cuts input)."""
    from .api_errors import ApiError

    for i, tokens in enumerate(texts):
        if len(tokens) > n_ctx:
            where = f"input[{i}]" if len(texts) > 1 else "input"
            raise ApiError(400, f"Invalid '{where}': it has {len(tokens)} tokens, more than 'options.num_ctx' ({n_ctx}).",
                           param=where)


@dataclass
class _State:
    keep_alive: float | None
    used: float  # time.monotonic() when it was last busy
    memory: MemoryEstimate | None = None


class Residency:
    """Per resident model: its keep_alive, when it was last used, its memory estimate."""

    def __init__(self, default_keep_alive: float | None) -> None:
        self.default = default_keep_alive
        self._models: dict[str, _State] = {}
        self._capacity: tuple[int, int] | None = None  # (RAM, GPU) bytes the devices reported before the first load

    def _state(self, name: str) -> _State:
        state = self._models.get(name)
        if state is None:
            state = self._models[name] = _State(self.default, time.monotonic())
        return state

    def touch(self, name: str) -> None:
        """``name`` is in use now: its idle time starts again."""
        self._state(name).used = time.monotonic()

    def keep(self, name: str, seconds: float | None) -> None:
        """A request's keep_alive for ``name`` (None: forever), counted from now or its end."""
        state = self._state(name)
        state.keep_alive = seconds
        state.used = time.monotonic()

    def keep_alive(self, name: str) -> float | None:
        return self._state(name).keep_alive

    def forget(self, name: str) -> None:
        """``name`` was unloaded: its next load starts with the server's default keep_alive."""
        self._models.pop(name, None)

    def expired(self, name: str, now: float) -> bool:
        state = self._state(name)
        return state.keep_alive is not None and now - state.used >= state.keep_alive

    def expires_at(self, name: str, busy: bool) -> str:
        """When an idle ``name`` will be unloaded, ISO 8601 in UTC (Ollama's expires_at; year 2318 for forever)."""
        state = self._state(name)
        now = time.monotonic()
        if state.keep_alive is None:
            left = FOREVER_SECONDS
        else:
            left = state.keep_alive - (0.0 if busy else now - state.used)
        when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=max(left, 0.0))
        return when.isoformat().replace("+00:00", "Z")

    # ---- memory ---------------------------------------------------------------------------

    def set_memory(self, name: str, estimate: MemoryEstimate | None) -> None:
        self._state(name).memory = estimate

    def memory(self, name: str) -> MemoryEstimate | None:
        state = self._models.get(name)
        return state.memory if state else None

    def snapshot_capacity(self) -> None:
        """What the devices report before the first model loads: the room all models share."""
        if self._capacity is None:
            self._capacity = available()

    def shortfall(self, need: MemoryEstimate, residents: list[str]) -> str | None:
        """None when ``need`` fits beside ``residents``; else why not, with the numbers."""
        from ..cache import human_size

        if self._capacity is None:
            return None
        ram_now, gpu_now = available()
        ram_cap, gpu_cap = self._capacity
        used = [m for m in (self.memory(r) for r in residents) if m is not None]
        ram_used, gpu_used = sum(m.cpu for m in used), sum(m.gpu for m in used)
        if need.cpu and (ram_used + need.cpu > ram_cap or need.cpu > ram_now):
            return (f"needs {human_size(need.cpu)} of RAM; {len(used)} resident model(s) hold {human_size(ram_used)} "
                    f"of {human_size(ram_cap)}")
        if need.gpu and (gpu_used + need.gpu > gpu_cap or need.gpu > gpu_now):
            return (f"needs {human_size(need.gpu)} of GPU memory; {len(used)} resident model(s) hold {human_size(gpu_used)} "
                    f"of {human_size(gpu_cap)}")
        return None


def available() -> tuple[int, int]:
    """(RAM available, GPU memory free less offload's margin, summed over the GPUs) as reported now."""
    from ..llama.devices import gpus
    from ..offload import gpu_budget, ram_available

    return ram_available(), sum(gpu_budget(d) for d in gpus())


def has_gpu() -> bool:
    """Whether layers can be offloaded here (a GPU build with a GPU, or GGUFRUN_SIMULATE_GPU)."""
    from ..llama.devices import gpus

    return bool(gpus())


def estimate(info: Any, cells: int, n_gpu_layers: Any, n_ctx_seq: int | None = None,
             cache_types: tuple[str, str] = ("f16", "f16")) -> MemoryEstimate:
    """The memory a model takes with ``cells`` KV cells and ``n_gpu_layers`` offloaded ("auto": as
    the loader would decide it now); on a machine without a GPU every layer is on the CPU. With
    each sequence in its own part of the cache (``n_ctx_seq`` cells), attention's scores span one
    part, not all cells: the compute allowance is that of one sequence's context. ``cache_types``:
    the KV cache's K and V types (--cache-type-k/-v), whose sizes the cache's bytes follow."""
    from dataclasses import replace

    whole = _estimate(info, cells, n_gpu_layers, cache_types)
    if n_ctx_seq is None or n_ctx_seq >= cells:
        return whole
    return replace(whole, compute=_estimate(info, n_ctx_seq, whole.n_gpu_layers, cache_types).compute)


def _estimate(info: Any, cells: int, n_gpu_layers: Any, cache_types: tuple[str, str]) -> MemoryEstimate:
    if not has_gpu():
        ngl = 0
    elif n_gpu_layers == "auto":
        from ..offload import plan

        ngl = plan(info, cells, cache_types=cache_types).n_gpu_layers
    else:
        ngl = int(n_gpu_layers)
    return info.memory_estimate(cells, n_gpu_layers=ngl, cache_types=cache_types)  # type: ignore[no-any-return]
