"""Intel AMX weight buffers: kept where llama.cpp's AMX kernel computes correctly on this machine,
dropped (alone, keeping CPU_REPACK) where it does not.

Why they can fail (issue 13). llama.cpp's AMX matmul (ggml-cpu/amx/mmq.cpp) runs its tile kernels
for batches of more than one token (one token goes to an AVX512-VNNI path). Each thread first
loads a tile configuration built on its stack (``ggml_tile_config_init``) with ``_tile_loadconfig``.
In GCC's amxtileintrin.h up to GCC 12.2 (and where a distribution reverts the later fix for
nvcc's sake) that intrinsic is an ``asm`` whose memory operand is one pointer wide, so the optimiser
deletes the stores to the config's rows and column widths as dead. Compiled here with
-O3 -march=sapphirerapids, GCC 11.3 zeroes 16 of the 64 bytes and leaves the rest stack garbage
(reserved bytes non-zero: LDTILECFG raises #GP, the SIGSEGV "in ggml_backend_amx_mul_mat" of
llama.cpp#20824, ollama#17006/#17205/#17249, dspy#10079); GCC 12.2 zeroes all 64 bytes and sets
only the palette, a configuration without tile shapes (the first tile load raises #UD: SIGILL).
Both configurations, built into ggml_tile_config_init on the H100 host's Xeon, crashed exactly so
(exit 139 and 132) on a 48-token batch; that host's GCC 13.3 uses ``__builtin_ia32_ldtilecfg``,
which reads all 64 bytes, and its build computes correctly (ollama fixed its crashes by moving its
builds from GCC 11 to 13). So
whether AMX is safe is a property of how this libggml-cpu was compiled (and of the hypervisor
keeping tile state), not of the model or quant type, and the direct test is to run it: a child
process loads a tiny model with and without the AMX buffers, on a 48-token batch and one
decode step, and compares the logits; a crash or a mismatch turns AMX off. The verdict is kept
in ``$GGUFRUN_HOME/amx-check.json`` per library file (path, size, mtime), CPU and kernel.

GGUFRUN_AMX_BUFFERS=1 keeps them on without the check, 0 turns them off; unset: the check decides.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..exits import signal_name

AMX = "AMX"  # ggml_backend_buft_name of the AMX buffer type
_TOLERANCE = 0.1  # largest |difference| over the largest |logit|: repacked vs plain kernels differ by up to 1e-2 here, a broken tile config by ~1
_lock = threading.Lock()
_decision: "Decision | None" = None


@dataclass(frozen=True)
class Check:
    """What running the AMX kernel here showed."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class Decision:
    """Whether llama.cpp may place weights in AMX buffers in this process, and why."""

    applies: bool  # this build and CPU offer an AMX buffer type at all
    keep: bool
    reason: str
    use_extra_bufts: bool = True  # False only where dropping AMX alone failed: llama_model_params' switch then drops all


def decide(setting: str | None, present: bool, check: Callable[[], Check]) -> Decision:
    """The guard's rule. ``setting`` is GGUFRUN_AMX_BUFFERS, ``present`` whether the CPU backend lists
    an AMX buffer type (compiled with AMX, and the kernel granted AMX state: ggml drops it itself
    when ARCH_REQ_XCOMP_PERM fails), ``check`` runs the kernel (called only when needed)."""
    if not present:
        return Decision(False, True, "no AMX buffer type in this build on this CPU")
    value = (setting or "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return Decision(True, True, "on (GGUFRUN_AMX_BUFFERS=1, not checked)")
    if value in ("0", "false", "no", "off"):
        return Decision(True, False, "off (GGUFRUN_AMX_BUFFERS=0)")
    result = check()
    return Decision(True, result.ok, ("on: " if result.ok else "off: ") + result.detail)


def ensure() -> Decision:
    """Decide once per process, before the first model load, and apply it: drop the AMX buffer
    type from the list llama.cpp reads at each load when it must go."""
    global _decision
    with _lock:
        if _decision is None:
            from . import libggml

            present = AMX in libggml.extra_buffer_types()
            decision = decide(os.environ.get("GGUFRUN_AMX_BUFFERS"), present, cached_check)
            if not decision.keep and not libggml.drop_extra_buffer_type(AMX):
                # Not droppable alone (an older ggml without the proc address): all extra buffers go.
                decision = Decision(True, False, decision.reason + "; all extra buffer types off", use_extra_bufts=False)
            _decision = decision
        return _decision


# ---- the check, in a child process ------------------------------------------------------------


def library_key() -> str:
    """What the verdict depends on: the CPU backend's library file(s), the CPU model, the kernel."""
    from llama_cpp._ggml import libggml

    lib_dir = Path(getattr(libggml, "_name", "") or ".").resolve().parent
    parts = []
    for lib in sorted({p.resolve() for p in lib_dir.glob("libggml-cpu*")}):  # a .so and its version links: one file
        st = lib.stat()
        parts.append(f"{lib}:{st.st_size}:{st.st_mtime_ns}")
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    return "|".join([*parts, cpu, platform.release()])


def cached_check() -> Check:
    """The verdict for this library, CPU and kernel: from the cache, or by running the check once."""
    from .. import paths

    key = library_key()
    try:
        entry = json.loads((paths.home() / "amx-check.json").read_text()).get(key)
        if entry:
            return Check(bool(entry["ok"]), str(entry["detail"]))
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    result = run_check()
    remember(result, key)
    return result


def remember(result: Check, key: str | None = None) -> None:
    """Keep ``result`` as this library's verdict in ``$GGUFRUN_HOME/amx-check.json``, beside the
    verdicts of other libraries (several installs share a home)."""
    from .. import paths

    cache = paths.home() / "amx-check.json"
    try:
        entries = json.loads(cache.read_text()) if cache.exists() else {}
        entries = entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        entries = {}
    entries[key or library_key()] = {"ok": result.ok, "detail": result.detail}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, cache)
    except OSError:
        pass  # an unwritable home: the check runs again next time


def run_check(timeout: float = 60.0, argv: list[str] | None = None) -> Check:
    """Run compare() in a child process (``argv``, default this module), so that a crashing AMX
    kernel takes only the child down."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "GGUFRUN_AMX_BUFFERS": "1",  # the child must not check again
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    # The parent owns the scratch folder: the child may die of the very crash it probes for, and then
    # its own cleanup never runs (a thousand leftover folders in /tmp showed it).
    with tempfile.TemporaryDirectory(prefix="ggufrun-amx-") as tmp:
        try:
            proc = subprocess.run((argv or [sys.executable, "-m", "ggufrun.llama.amx"]) + [tmp], capture_output=True,
                                  text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Check(False, f"the AMX check did not finish in {timeout:.0f} s")
    took = f"{time.perf_counter() - started:.1f} s"
    if proc.returncode < 0:
        name = signal_name(proc.returncode)
        return Check(False, f"a tiny model crashed with {name} in llama.cpp's AMX kernel (checked in {took}; "
                     "see ggufrun/llama/amx.py for the cause)")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return Check(False, f"the AMX check failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return verdict(json.loads(lines[-1]), took)


def verdict(result: dict[str, Any], took: str = "") -> Check:
    """Read compare()'s result: the logits with AMX buffers must match those without."""
    worst = max(result["diffs"].values())
    where = ", ".join(f"{k} {v:.1e}" for k, v in result["diffs"].items())
    if not result.get("amx_used"):
        return Check(True, f"llama.cpp placed no weights in AMX buffers in the check ({where})")
    suffix = f"; checked in {took}" if took else ""
    if worst <= _TOLERANCE:
        return Check(True, f"its logits match the plain CPU kernels' (relative difference {where}{suffix})")
    return Check(False, f"its logits differ from the plain CPU kernels' (relative difference {where}{suffix})")


_SHAPE = "qwen2:layers=1,dim=256,heads=4,kv_heads=2,ff=512,vocab=512"  # every weight a whole number of AMX tiles
_QUANTS = ("q4_k_m", "q4_0")  # AMX's two kernel families: 256-wide K-quant blocks, 32-wide legacy blocks


def compare(workdir: Path, threads: int = 0) -> dict[str, Any]:
    """Logits of tiny synthetic models loaded with llama.cpp's extra CPU buffer types (AMX where
    present) against the same models without any: a 48-token batch (AMX's tile kernel) and one
    decode step (its VNNI path). Returns the relative differences and whether AMX held weights."""
    from .. import paths
    from ..synthetic import write_synthetic
    from ._lib import L, init_backend, quiet_log

    np = __import__("numpy")
    init_backend()
    logs: list[str] = []

    @L.llama_log_callback
    def _log(level: int, text: bytes, user_data: Any) -> None:
        logs.append(text.decode("utf-8", "replace"))

    L.llama_log_set(_log, None)  # to see which buffer types the weights went to
    threads = threads or max(2, min(8, os.cpu_count() or 2))
    diffs: dict[str, float] = {}
    try:
        for quant in _QUANTS:
            path = write_synthetic(workdir / f"amx-{quant}.gguf", _SHAPE, quant=quant, seed=1)
            rng = np.random.default_rng(0)
            prompt = [int(t) for t in rng.integers(10, 500, size=48)]
            ours = _logits(L, np, path, True, prompt, threads)
            ref = _logits(L, np, path, False, prompt, threads)
            for step, (a, b) in (("batch", (ours[0], ref[0])), ("decode", (ours[1], ref[1]))):
                diffs[f"{quant} {step}"] = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-6))
    finally:
        L.llama_log_set(None if paths.debug() else quiet_log, None)  # _log dies with this frame
    buffers = sorted({line.split(":", 1)[-1].split("model buffer")[0].strip() for line in logs if "model buffer size" in line})
    return {"diffs": diffs, "amx_used": AMX in buffers, "buffers": buffers, "threads": threads}


def _logits(L: Any, np: Any, path: Path, extra: bool, prompt: list[int], threads: int) -> tuple[Any, Any]:
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = extra
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 128
    cp.n_threads = cp.n_threads_batch = threads
    cp.no_perf = True
    cp.op_offload = False  # a visible GPU must not take the reference's batch: compare CPU kernels only
    ctx = L.llama_init_from_model(model, cp)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(len(prompt), 0, 1)
    try:
        out = []
        for start, tokens in ((0, prompt), (len(prompt), [prompt[0]])):
            batch.n_tokens = len(tokens)
            for i, tok in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, start + i, 1, 1
                batch.seq_id[i][0] = 0
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            out.append(np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(len(tokens), n_vocab)).copy())
        return out[0], out[1]
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)


def _main(argv: list[str]) -> int:
    if argv:  # the folder run_check made and will remove
        print(json.dumps(compare(Path(argv[0]))), flush=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="ggufrun-amx-") as tmp:
        print(json.dumps(compare(Path(tmp))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
