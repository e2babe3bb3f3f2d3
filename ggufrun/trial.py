"""A trial run in a child process, so that a GGUF which makes llama.cpp abort (a GGML_ASSERT or a
segfault that gguf_info's checks do not foresee) kills the child, not the server holding other
models or the command the user ran.

The child loads the file the way the commands do (memory-mapped) with a small context, then runs
a real forward step: a prompt, one greedily generated token fed back, and the text of both. That
covers the three places crafted files were seen to crash: hyperparameter loading and graph
reservation (the load), and the first matrix multiplication or norm (the step), where a tensor
patched to an integer type or a NaN epsilon only shows. Every command that loads a model in its
own process (serve, chat, bench, quantize) runs it first. A file that passed (by real path, size
and mtime, with this ggufrun and llama.cpp) is remembered under $GGUFRUN_HOME/trials, so the cost,
about a second, is paid once per file rather than per command.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from .errors import ConfigError, ModelLoadError
from .exits import signal_name

TRIAL_SECONDS = 300.0
_CONFIG_EXIT = 2  # the child's exit status for a ConfigError (a bad setting, not a bad file)
TRIAL_PROMPT = "Hello, world. 1 + 1 ="
_passed: set[str] = set()


def _key(p: Path) -> str:
    from importlib import metadata

    from . import __version__

    st = p.stat()
    try:
        llama = metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        llama = "?"
    return hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{__version__}\0{llama}".encode()).hexdigest()


def _stamp(key: str) -> Path:
    from . import paths

    return paths.home() / "trials" / key


def trial_load(path: str | Path, *, validated: bool = False) -> None:
    """Load ``path`` and run one forward step in a child process, once per file; raise the child's
    one-line error (GgufrunError) or ModelLoadError when llama.cpp crashed or hung there.
    ``validated``: the caller has just passed the file through gguf_info.validate."""
    from .gguf_info import validate

    p = Path(path).resolve()
    key = _key(p)
    if key in _passed or _stamp(key).is_file():
        _passed.add(key)
        return
    if not validated:
        validate(p)  # what the header checks refuse needs no child: the same one line, in milliseconds
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                       os.environ.get("PYTHONPATH")]))}
    env.pop("GGUFRUN_DEBUG", None)  # the child's error must stay one line
    env["GGML_NO_BACKTRACE"] = "1"  # an abort is an abort: no debugger attached to the child
    try:
        # close_fds (the default, said out loud): the child holds none of our sockets or files
        proc = subprocess.run([sys.executable, "-m", "ggufrun.trial", str(p)], capture_output=True, text=True,
                              errors="replace", timeout=TRIAL_SECONDS, env=env, check=False, close_fds=True,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ModelLoadError(f"Test-loading {p.name} did not finish within {TRIAL_SECONDS:g} s.") from None
    if proc.returncode == 0:
        _passed.add(key)
        _remember(key)
        return
    if proc.returncode < 0:
        name = signal_name(proc.returncode)
        asserts = [line for line in proc.stderr.splitlines() if "GGML_ASSERT" in line or "error" in line.lower()]
        why = f": {asserts[0].split(': ', 1)[-1][:200]}" if asserts else ""
        raise ModelLoadError(f"llama.cpp crashed ({name}) test-loading {p.name}{why}.",
                             "The file is malformed; it was not loaded.")
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("Error: ")]
    last = (lines or proc.stderr.strip().splitlines() or ["unknown failure"])[-1].removeprefix("Error: ")
    if proc.returncode == _CONFIG_EXIT:  # the settings are at fault, not the file: the same error as in-process
        raise ConfigError(last[:500])
    raise ModelLoadError(f"Test-loading {p.name} failed: {last[:500]}")


def _remember(key: str) -> None:
    stamp = _stamp(key)
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()
    except OSError:
        pass  # a read-only home: the trial simply runs again next time


def _child(path: str) -> int:
    from .errors import GgufrunError
    from .gguf_info import validate
    from .runtime import Model
    from .settings import Settings

    try:
        info = validate(path)
        n_ctx = min(256, info.context_length or 256)
        with Model.load(path, Settings(n_ctx=n_ctx, batch_size=n_ctx, ubatch_size=n_ctx, threads=1),
                        validate=False) as model:
            tokens = model.tokenize(TRIAL_PROMPT, add_special=True, parse_special=True)[: n_ctx // 2] or [0]
            model.decode([(0, tokens, True)])
            # one output (the prompt's last token): row 0 of the buffer. decode() returns batch positions,
            # for llama_get_logits_ith; reading that many rows went past a GPU build's buffer (SIGSEGV)
            token = int(model.logits_rows(1)[0].argmax())
            model.decode([(0, [token], True)])
            model.logits_rows(1)[0].argmax()  # reads the logits: waits for the step to finish
            model.detokenize([*tokens, token], special=True)
    except GgufrunError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return _CONFIG_EXIT if isinstance(exc, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
