"""Shared by the bench scripts: find llama.cpp's reference tools and the model files to measure, and
run servers as separate processes. Only ggufrun's public CLI and API are used, so a refactor inside
ggufrun cannot break these scripts silently.

Run the scripts with ggufrun importable (installed, or ``PYTHONPATH=.`` from the checkout).
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
# A workplace checkout has shared/ beside it; elsewhere pass the tool's path.
REFERENCE_TOOL = ROOT.parent / "shared" / "tools" / "build-reference-llama-cpp"
GGUFRUN = [sys.executable, "-m", "ggufrun.cli.main"]  # this Python's ggufrun, also from a source tree


def find_tool(name: str, given: str | None) -> Path:
    """``given`` (a binary or its bin folder), else $LLAMA_BIN, else PATH, else the reference build
    under ~/.cache/ggufrun-reference (built from llama-cpp-python's vendored llama.cpp)."""
    given = given or os.environ.get("LLAMA_BIN")
    if given:
        path = Path(given).expanduser()
        path = path / name if path.is_dir() else path
        if not path.is_file():
            sys.exit(f"{name} not found at {path}.")
        return path
    found = shutil.which(name)
    if found:
        return Path(found)
    for candidate in sorted(Path.home().glob(f".cache/ggufrun-reference/*/build/bin/{name}"), reverse=True):
        return candidate
    sys.exit(f"{name} not found: pass its path or bin folder, or build it with `bash {REFERENCE_TOOL}` "
             "(it prints the bin folder; about 8 minutes on 2 cores).")


def model_path(name: str) -> Path:
    """A .gguf path as given, or a registry name fetched into the cache (`ggufrun pull`, `ggufrun path`)."""
    if name.endswith(".gguf") and Path(name).is_file():
        return Path(name).resolve()
    found = subprocess.run([*GGUFRUN, "path", name], capture_output=True, text=True)
    if found.returncode != 0:
        pulled = subprocess.run([*GGUFRUN, "pull", name], stdout=subprocess.DEVNULL)
        if pulled.returncode != 0:
            sys.exit(f"cannot fetch {name} (ggufrun pull exited {pulled.returncode}).")
        found = subprocess.run([*GGUFRUN, "path", name], capture_output=True, text=True)
    if found.returncode != 0:
        sys.exit(f"cannot find {name}: {found.stderr.strip()}")
    return Path(found.stdout.strip())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(argv: Sequence[str], port: int, ready_timeout: float = 300.0) -> Iterator[str]:
    """Start a server process listening on 127.0.0.1:``port``, wait until /health answers 200, yield
    its URL; stop it (SIGTERM, then SIGKILL) on the way out. Its log goes to a temporary file, whose
    tail is shown when it fails to start."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + ready_timeout
            while not _healthy(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode("utf-8", "replace").strip().splitlines()[-15:]
                    why = f"exited with {proc.returncode}" if proc.returncode is not None else "did not become ready"
                    raise RuntimeError(f"{argv[0]} {why}:\n" + "\n".join(tail))
                time.sleep(0.2)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            keep = os.environ.get("BENCH_SERVER_LOG")  # e.g. with GGUFRUN_STEP_PROFILE=1: the server's own account
            if keep:
                log.seek(0)
                with open(keep, "ab") as f:
                    f.write(f"==== {' '.join(argv)}\n".encode() + log.read())


def _healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def bench_row(args: Sequence[str], python: str = sys.executable, extra_env: Mapping[str, str] | None = None) -> dict[str, float]:
    """pp and tg tokens/s of one `ggufrun bench ARGS --no-quality --format json` configuration, run by
    ``python`` (a llama-cpp-python build to compare) with this checkout importable and ``extra_env``
    set; exits (SystemExit) on failure."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {})}
    cmd = [python, "-m", "ggufrun.cli.main", "bench", *args, "--no-quality", "--format", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    import json

    (row,) = json.loads(proc.stdout)["rows"]
    if row["error"]:
        sys.exit(f"ggufrun bench failed: {row['error']}")
    return {"pp": float(row["pp_tps"]), "tg": float(row["tg_tps"])}
