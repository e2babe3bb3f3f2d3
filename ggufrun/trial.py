"""A trial load in a child process, so that a GGUF which makes llama.cpp abort (a GGML_ASSERT that
gguf_info.check_model does not foresee) kills the child, not the server holding other models.

The child loads the file the way the server will (memory-mapped, so weights are not read) with a
small context, which runs llama.cpp's hyperparameter loading and its graph reservation: the two
places where crafted files were seen to abort. Each file (by path, size and mtime) is tried once
per process. The cost, about a second per file, is paid only by ``serve``; chat and bench rely on
the in-process checks, since a crash there takes down nothing but the command itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .errors import ModelLoadError

TRIAL_SECONDS = 300.0
_passed: set[tuple[str, int, int]] = set()


def trial_load(path: str | Path) -> None:
    """Load ``path`` once in a child process; raise the child's one-line error (GgufrunError) or
    ModelLoadError when llama.cpp crashed or hung there."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key in _passed:
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                       os.environ.get("PYTHONPATH")]))}
    env.pop("GGUFRUN_DEBUG", None)  # the child's error must stay one line
    try:
        proc = subprocess.run([sys.executable, "-m", "ggufrun.trial", str(p)], capture_output=True, text=True,
                              errors="replace", timeout=TRIAL_SECONDS, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise ModelLoadError(f"Test-loading {p.name} did not finish within {TRIAL_SECONDS:g} s.") from None
    if proc.returncode == 0:
        _passed.add(key)
        return
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        asserts = [line for line in proc.stderr.splitlines() if "GGML_ASSERT" in line or "error" in line.lower()]
        why = f": {asserts[0].split(': ', 1)[-1][:200]}" if asserts else ""
        raise ModelLoadError(f"llama.cpp crashed ({name}) test-loading {p.name}{why}.",
                             "The file is malformed; it was not loaded.")
    last = (proc.stderr.strip().splitlines() or ["unknown failure"])[-1].removeprefix("Error: ")
    raise ModelLoadError(f"Test-loading {p.name} failed: {last}")


def _child(path: str) -> int:
    from .errors import GgufrunError
    from .gguf_info import validate
    from .runtime import Model
    from .settings import Settings

    try:
        info = validate(path)
        n_ctx = min(256, info.context_length or 256)
        with Model.load(path, Settings(n_ctx=n_ctx, batch_size=n_ctx, ubatch_size=n_ctx, threads=1), validate=False):
            pass
    except GgufrunError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
