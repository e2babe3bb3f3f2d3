"""A bounded fuzz of crafted GGUF files (tests/crafted.py fuzz_cases: metadata values and types,
nesting, sizes, tokenizer arrays, tensor types and offsets, random header bytes) through `show`,
`chat -p` and a multi-model `serve`: no signal, no traceback, no hang; a failure is one line
(`Error: ...` and exit 1 or 2, or an HTTP error in the API's shape), and the good model served
beside the bad ones keeps answering. A handful of cases run by default, all of them with -m slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crafted import fuzz_cases
from serverutil import post_json, serve

ROOT = Path(__file__).resolve().parent.parent
# The cases that crashed or hung a command before (issue 20), one per kind, and a valid copy.
FAST = ("valid_copy", "kv-qwen2.attention.layer_norm_rms_epsilon-nan", "kv-qwen2.attention.layer_norm_rms_epsilon-neg",
        "kv-qwen2.rope.scaling.type-garbage", "tokens-duplicate", "tokens-empty", "type-blk.0.attn_q.weight-25",
        "type-blk.0.attn_norm.weight-26", "nest-3000", "string-2mb", "n_kv-2^40", "offset-blk.0.attn_q.weight-1")
CASES = fuzz_cases()
PER_FILE_SECONDS = 20  # a load and a few tokens of a 300 KB model; a hang is far beyond


def _build(names: tuple[str, ...] | list[str], src: Path, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [CASES[name](src, folder / f"{i:03d}.gguf") for i, name in enumerate(names)]


def _drive(command: list[str], files: list[Path], home: Path) -> list[dict]:
    """Run ``command`` on every file in one process (tests/fuzz_driver.py); fail naming the file
    if the process died by a signal or ran past its time."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "GGUFRUN_HOME": str(home),
           "GGUFRUN_OFFLINE": "1"}
    env.pop("GGUFRUN_DEBUG", None)
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz_driver.py"), *command, "--", *map(str, files)],
                              capture_output=True, text=True, timeout=30 + PER_FILE_SECONDS * len(files), env=env, check=False)
        out = proc.stdout
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        proc = None
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    ends = [line for line in lines if "file" in line]
    starts = [line["start"] for line in lines if "start" in line]
    if proc is None or proc.returncode != 0 or len(ends) != len(files):
        last = starts[-1] if starts else None
        why = "hung" if proc is None else f"exited with {proc.returncode}"
        pytest.fail(f"{command[0]} {why} on {last}: {(proc.stderr if proc else '')[-1500:]}")
    return ends


def _check_one_line(results: list[dict], names: list[str]) -> None:
    for name, r in zip(names, results):
        assert r["code"] != "traceback", f"{name}: {r['traceback']}"
        assert r["code"] in (0, None, 1, 2), f"{name}: exit {r['code']}: {r['stderr']}"
        if r["code"] not in (0, None):
            lines = r["stderr"].strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("Error: "), f"{name}: {r['stderr'][-1500:]}"
        assert r["seconds"] < PER_FILE_SECONDS, f"{name}: {r['seconds']} s"


def _fuzz(names: list[str], tiny_model_factory, tmp_path: Path) -> dict[str, int]:
    src = tiny_model_factory("qwen2", "f16", True)
    files = _build(names, src, tmp_path / "crafted")
    home = tmp_path / "home"
    _check_one_line(_drive(["show"], files, home), names)
    _check_one_line(_drive(["chat", "-p", "hi", "--threads", "1", "--max-tokens", "4"], files, home), names)

    good = tiny_model_factory("qwen2", "q8_0", True)
    config = tmp_path / "serve.toml"
    config.write_text(f'[[models]]\nmodel = "{good}"\nserved_model_name = "good"\nthreads = 1\n\n' + "".join(
        f'[[models]]\nmodel = "{f}"\nserved_model_name = "bad{i}"\nthreads = 1\n\n' for i, f in enumerate(files)),
        encoding="utf-8")
    statuses: dict[str, int] = {}
    with serve("--config", str(config), "--max-loaded", "2", env={"GGUFRUN_HOME": str(home)}) as srv:
        for i, name in enumerate(names):
            status, body = post_json(f"{srv.url}/v1/completions", {"model": f"bad{i}", "prompt": "hi", "max_tokens": 2})
            statuses[name] = status
            assert srv.proc.poll() is None, f"{name} killed the server: {srv.log()[-2000:]}"
            assert status == 200 or (400 <= status < 600 and "\n" not in body["error"]["message"]), (name, body)
            status, body = post_json(f"{srv.url}/v1/completions", {"model": "good", "prompt": "hi", "max_tokens": 2})
            assert status == 200 and body["usage"]["completion_tokens"] >= 1, (name, body)
        log = srv.log()
        assert "Traceback" not in log and "gdb" not in log, log[log.find("Traceback") - 500:][:3000]
    return statuses


def test_fuzz_fast_subset(tiny_model_factory, tmp_path: Path) -> None:
    statuses = _fuzz(list(FAST), tiny_model_factory, tmp_path)
    assert statuses["valid_copy"] == 200, statuses  # the harness itself breaks nothing
    assert all(s >= 400 for name, s in statuses.items() if name != "valid_copy"), statuses


@pytest.mark.slow
def test_fuzz_every_case(tiny_model_factory, tmp_path: Path) -> None:
    statuses = _fuzz(sorted(CASES), tiny_model_factory, tmp_path)
    print(f"fuzzed {len(statuses)} files: {sum(s == 200 for s in statuses.values())} served, "
          f"{sum(s != 200 for s in statuses.values())} refused")
