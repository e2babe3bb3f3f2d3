"""ggml's backend API through ctypes: devices, RPC workers, CPU features, the abort hook.

llama-cpp-python binds llama.h but not ggml-backend.h / ggml-rpc.h, and its own ``rpc_servers``
parameter does nothing in this version, so RPC workers are registered here the way llama.cpp's
``--rpc`` does it (common/arg.cpp: ``ggml_backend_rpc_add_server`` + ``ggml_backend_register``).
The RPC entry points are looked up through the "RPC" backend registry's proc addresses, so the
same code works whether ggml-rpc is linked in or loaded dynamically (GGML_BACKEND_DL).
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError, RpcError
# the CPU backend's features and buffer types live a floor down (amx.py needs them, and this module
# needs amx.py's decision for cpu_backend); re-exported here, where callers have always found them
from .libggml import cpu_features as cpu_features
from .libggml import drop_extra_buffer_type as drop_extra_buffer_type
from .libggml import extra_buffer_types as extra_buffer_types
from .libggml import load, text as decode
from .libggml import remove_from_null_terminated as remove_from_null_terminated

_TYPES = ("cpu", "gpu", "igpu", "accel", "meta")  # enum ggml_backend_dev_type, in order
_registered: dict[str, list[int]] = {}  # endpoint -> its device pointers, registered once per process
_lock = threading.Lock()
_abort_cb: Any = None  # keep the ctypes callback alive for the life of the process
_fatal_handlers: list[Callable[[str], None]] = []

NO_RPC_HINT = ('Reinstall llama-cpp-python with RPC: CMAKE_ARGS="-DGGML_RPC=ON" pip install --force-reinstall '
               "--no-cache-dir --no-deps llama-cpp-python (see the README\'s set-up).")


@dataclass(frozen=True)
class Device:
    """One ggml backend device as llama.cpp sees it (a local CPU or GPU, or an RPC worker's device)."""

    name: str  # "CPU", "CUDA0", "RPC0"
    description: str  # for RPC devices, the worker's endpoint
    type: str  # cpu, gpu, igpu, accel
    backend: str  # the registry: "CPU", "CUDA", "RPC[127.0.0.1:50052]"
    free: int
    total: int


def _device(ptr: int) -> Device:
    lib = load()
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    lib.ggml_backend_dev_memory(ptr, ctypes.byref(free), ctypes.byref(total))
    kind = lib.ggml_backend_dev_type(ptr)
    return Device(decode(lib.ggml_backend_dev_name(ptr)), decode(lib.ggml_backend_dev_description(ptr)),
                  _TYPES[kind] if 0 <= kind < len(_TYPES) else str(kind),
                  decode(lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(ptr))), free.value, total.value)


def devices() -> list[Device]:
    """Every device in ggml's registry, local ones first, then registered RPC workers' devices."""
    lib = load()
    return [_device(lib.ggml_backend_dev_get(i)) for i in range(lib.ggml_backend_dev_count())]


def rpc_supported() -> bool:
    """Whether the installed llama.cpp was built with GGML_RPC=ON."""
    return bool(load().ggml_backend_reg_by_name(b"RPC"))


def _rpc_proc(name: str, restype: Any, *argtypes: Any) -> Any:
    lib = load()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise RpcError("This llama-cpp-python was built without RPC support (GGML_RPC).", NO_RPC_HINT)
    addr = lib.ggml_backend_reg_get_proc_address(reg, name.encode())
    if not addr:
        raise RpcError(f"This llama.cpp's RPC backend has no {name}.", NO_RPC_HINT)
    return ctypes.CFUNCTYPE(restype, *argtypes)(addr)


def _reachable(endpoint: str, timeout: float = 5.0) -> None:
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RpcError(f"RPC worker {endpoint} is not reachable: {reason}.",
                       f"Start it there with: ggufrun rpc-worker --host {host} --port {port}") from None


def add_workers(endpoints: list[str]) -> list[Device]:
    """Register each worker's devices with ggml (once per process); return them. Raise RpcError.

    llama.cpp aborts the whole process when a worker cannot be reached or stops answering, so
    each endpoint is probed first, and the abort hook turns a later loss into one clear line.
    """
    add_server = _rpc_proc("ggml_backend_rpc_add_server", ctypes.c_void_p, ctypes.c_char_p)
    lib = load()
    out: list[Device] = []
    with _lock:
        for endpoint in endpoints:
            if endpoint not in _registered:
                _reachable(endpoint)
                install_abort_hook()
                reg = add_server(endpoint.encode())
                if not reg:
                    raise RpcError(f"RPC worker {endpoint} offers no devices.")
                lib.ggml_backend_register(reg)
                _registered[endpoint] = [lib.ggml_backend_reg_dev_get(reg, i) for i in range(lib.ggml_backend_reg_dev_count(reg))]
            out.extend(_device(p) for p in _registered[endpoint])
    return out


def model_devices(endpoints: list[str]) -> Any:
    """The NULL-terminated device array for llama_model_params.devices, or None for llama.cpp's default.

    Registered RPC workers stay in ggml's process-wide registry, so once any is registered each
    model names its own: these endpoints' devices first (as llama.cpp orders them), then local GPUs.
    """
    if endpoints:
        add_workers(endpoints)
    if not _registered:
        return None
    chosen = _offload_order(endpoints)
    return (ctypes.c_void_p * (len(chosen) + 1))(*chosen, None)


def offload_devices(endpoints: list[str]) -> list[Device]:
    """The devices llama.cpp would offload to, in its order: these workers' devices, then local GPUs."""
    if endpoints:
        add_workers(endpoints)
    return [_device(p) for p in _offload_order(endpoints)]


def _offload_order(endpoints: list[str]) -> list[Any]:
    """Device pointers, in the order a model offloads to them: these workers' devices, then the
    local GPUs (integrated ones only where there is no other), as llama.cpp picks by default.
    One function, so that the devices a tensor_split or main_gpu is checked against are the ones
    the model is given."""
    lib = load()
    remote = {p for ptrs in _registered.values() for p in ptrs}
    local = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    local = [p for p in local if p not in remote]
    gpus = [p for p in local if lib.ggml_backend_dev_type(p) == 1]  # GGML_BACKEND_DEVICE_TYPE_GPU
    igpus = [p for p in local if lib.ggml_backend_dev_type(p) == 2]  # GGML_BACKEND_DEVICE_TYPE_IGPU
    return [p for e in endpoints for p in _registered[e]] + (gpus or igpus)


def on_fatal(handler: Callable[[str], None]) -> None:
    """Call ``handler(message)`` (briefly) before the process exits on a llama.cpp abort, e.g. so a
    server can fail its health check and answer its clients; it runs on a llama.cpp thread."""
    _fatal_handlers.append(handler)


def install_abort_hook() -> None:
    """Replace ggml's abort (a backtrace, then SIGABRT) with one line and exit status 1.

    ggml_abort() still calls abort() when the hook returns, so the hook never returns: it tells
    the user what happened and ends the process. llama.cpp cannot recover from a lost RPC worker
    (ggml-rpc.cpp: RPC_STATUS_ASSERT), so exiting cleanly is the best a client can do.
    """
    global _abort_cb
    from .. import paths

    if _abort_cb is not None or paths.debug():  # GGUFRUN_DEBUG=1 keeps ggml's backtrace
        return

    @ctypes.CFUNCTYPE(None, ctypes.c_char_p)
    def _on_abort(message: bytes | None) -> None:
        first = decode(message).strip().splitlines()[0] if message else "unknown error"
        detail = first.split(": ", 1)[-1]
        if "RPC" in first or "rpc" in first:
            line = f"Error: lost an RPC worker ({detail}); llama.cpp cannot continue without it, so ggufrun exits."
        else:
            line = f"Error: llama.cpp aborted: {detail}. Set GGUFRUN_DEBUG=1 for its backtrace."
        try:
            os.write(2, (line + "\n").encode())
            for handler in list(_fatal_handlers):
                handler(line)
        finally:
            os._exit(1)

    _abort_cb = _on_abort
    load().ggml_set_abort_callback(ctypes.cast(_on_abort, ctypes.c_void_p))


# /proc/cpuinfo flag -> the ggml CPU feature that uses it (x86; other CPUs report their own names)
_X86_FLAGS = {"avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2", "avx_vnni": "AVX_VNNI", "avx512f": "AVX512",
              "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16", "amx_int8": "AMX_INT8"}


def cpu_backend(cpu_flags: set[str] | None = None) -> dict[str, str]:
    """Which CPU kernels this build runs here: the instruction sets it uses, those this CPU has that
    it leaves unused (a portable build on a newer CPU), the extra weight buffer types (repacked
    and AMX kernels) llama.cpp places weights in, and why AMX weight buffers are on or off."""
    from . import amx

    feats = cpu_features()
    if cpu_flags is None:
        cpu_flags = set()
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith("flags"):
                        cpu_flags = set(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
    isa = [k for k, v in feats.items() if v == "1" and k not in ("LLAMAFILE", "OPENMP", "REPACK", "CPU_HBM", "ACCELERATE", "KLEIDIAI")]
    unused = [f for flag, f in _X86_FLAGS.items() if flag in cpu_flags and f not in feats]
    out = {"features": " ".join(isa) or "none reported", "unused_by_build": " ".join(unused) or "none"}
    decision = amx.ensure()  # the same decision a model load applies, so this reports what loads use
    out["extra_buffers"] = (" ".join(extra_buffer_types()) or "none") if decision.use_extra_bufts else "none (use_extra_bufts off)"
    if decision.applies:
        out["amx_weight_buffers"] = decision.reason
    elif feats.get("AMX_INT8") == "1":  # compiled in, but ggml's ARCH_REQ_XCOMP_PERM failed, so ggml left it out
        out["amx_weight_buffers"] = "off: the kernel did not grant AMX tile state (\"AMX is not ready to be used!\")"
    return out


def start_worker(host: str, port: int, device_names: list[str], cache_dir: str | None, threads: int,
                 announce: Callable[[str], None] = lambda s: None) -> None:
    """Run ggml's RPC server on this host's devices until interrupted. Raise RpcError / ConfigError.

    ggml_backend_rpc_start_server() blocks in C forever, so it runs on a daemon thread and the
    main thread waits, which keeps Ctrl-C and SIGTERM working.
    """
    start = _rpc_proc("ggml_backend_rpc_start_server", None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                      ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p))
    lib = load()
    ptrs = []
    for name in device_names:
        ptr = lib.ggml_backend_dev_by_name(name.encode())
        if not ptr:
            known = ", ".join(d.name for d in devices() if not d.backend.startswith("RPC"))
            raise ConfigError(f"Unknown device {name!r}.", f"Devices here: {known}.")
        ptrs.append(ptr)
    if not ptrs:  # as llama.cpp's rpc-server: every accelerator, else the CPU
        local = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
        ptrs = [p for p in local if lib.ggml_backend_dev_type(p) in (1, 2)] or [p for p in local if lib.ggml_backend_dev_type(p) == 0]
    try:  # the C server takes a dotted IPv4 address only (inet_addr) and says little when bind fails
        addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as exc:
        raise ConfigError(f"Cannot resolve --host {host!r} to an IPv4 address: {exc.strerror}.") from None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((addr, port))
        except OSError as exc:
            raise RpcError(f"Cannot listen on {addr}:{port}: {exc.strerror}.", "Choose another --port.") from None
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
    arr = (ctypes.c_void_p * len(ptrs))(*ptrs)
    announce(f"RPC worker on {addr}:{port}, devices: " + ", ".join(_device(p).name for p in ptrs)
             + (f", tensor cache {cache_dir}" if cache_dir else ""))
    done = threading.Event()

    def serve() -> None:
        try:
            start(f"{addr}:{port}".encode(), cache_dir.encode() if cache_dir else None, threads, len(ptrs), arr)
        finally:
            done.set()

    threading.Thread(target=serve, name="ggml-rpc-server", daemon=True).start()
    while not done.wait(0.5):
        pass
    sys.stdout.flush()
    raise RpcError(f"The RPC server on {addr}:{port} stopped; llama.cpp's message is above.")
