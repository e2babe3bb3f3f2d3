"""``ggufrun ARGS`` run through the real entry point in the test's own process."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest


def run_here(capsys: pytest.CaptureFixture[str], *args: str, env: dict[str, str] | None = None,
             text: bool = False) -> subprocess.CompletedProcess[Any]:
    """``ggufrun ARGS`` through ggufrun.cli.main.main, the function the console script calls, in this process: its
    exit status and what it wrote, as subprocess.run gives them (``text``: str, else bytes). For commands that refuse,
    read a header or talk to a test's hub, where a process of their own added only its start (0.15-0.7 s of CPU:
    Python, click and the command's imports); what needs a process (signals, a terminal, llama.cpp's own output
    or a crash of it, a second process resuming the first's work) keeps one."""

    from ggufrun.cli.main import main

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (env or {}).items():
            mp.setenv(name, value)
        try:  # the console script is sys.exit(main()): what main returns is the exit status too
            raise SystemExit(main(list(args)))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    out, err = capsys.readouterr()
    if text:
        return subprocess.CompletedProcess(["ggufrun", *args], code, out, err)
    return subprocess.CompletedProcess(["ggufrun", *args], code, out.encode(), err.encode())
