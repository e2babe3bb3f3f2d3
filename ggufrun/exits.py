"""What a child process's exit status says, in words: trial loads, the AMX check and benchmark
workers run llama.cpp in child processes, which may die of a signal."""

from __future__ import annotations

import signal


def signal_name(returncode: int) -> str:
    """The signal a negative ``returncode`` (subprocess's "killed by") names: "SIGSEGV" for -11,
    "signal 40" for one without a name (the real-time signals between SIGRTMIN and SIGRTMAX)."""
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"
