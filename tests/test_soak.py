"""A short run of bench/soak.py: a real server on loopback with concurrent streaming clients, random
disconnects, an overflowing queue and a SIGTERM-and-restart must finish with no error that is not a
deliberate 503, no stall over 2 s and no RSS growth over 10%."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _soak(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "0.75", "--clients", "16",
                           "--parallel", "4", "--max-queue", "4", "--threads", "1", "--json", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    return proc, json.loads(out.read_text()) if out.exists() else {}


@pytest.mark.slow
def test_short_soak_of_streaming_chat_and_embeddings(tmp_path: Path) -> None:
    proc, summary = _soak(tmp_path, "--embed-share", "0.2")
    assert summary, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary["ok"] > 0 and summary["embeddings"] > 0 and summary["deliberate_503"] > 0  # the queue overflowed
    assert summary["restart_seconds"] is not None and summary["restart_seconds"] < 10
    assert proc.returncode == 0 and summary["passed"], summary["failures"]
