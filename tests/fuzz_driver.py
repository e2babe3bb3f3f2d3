"""Run one ggufrun command on many files in one process: ``python fuzz_driver.py CMD ARGS -- FILE...``.

For each file it prints a JSON line before it starts ({"start": FILE}) and one when it ends
({"file", "code", "stderr", "seconds", "traceback"}), so a signal or a hang names the file that
caused it, and the test pays one interpreter start-up for the whole set rather than one per file.
The command runs through ggufrun.cli.main.main, the same error boundary as the real CLI.
"""

from __future__ import annotations

import io
import json
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout


def run(cmd: list[str], path: str) -> dict[str, object]:
    from ggufrun.cli.main import main

    err, out = io.StringIO(), io.StringIO()
    started = time.monotonic()
    code: object = 0
    trace = None
    with redirect_stderr(err), redirect_stdout(out):
        try:
            main([cmd[0], path, *cmd[1:]])
        except SystemExit as exc:
            code = exc.code
        except BaseException:  # noqa: BLE001 (what escapes the error boundary is the finding)
            trace = traceback.format_exc()
            code = "traceback"
    return {"file": path, "code": code, "stderr": err.getvalue(), "seconds": round(time.monotonic() - started, 3),
            "traceback": trace}


if __name__ == "__main__":
    split = sys.argv.index("--")
    command, files = sys.argv[1:split], sys.argv[split + 1 :]
    for f in files:
        print(json.dumps({"start": f}), flush=True)
        print(json.dumps(run(command, f)), flush=True)
