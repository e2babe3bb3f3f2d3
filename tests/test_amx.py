"""The AMX guard (issue 13): its rule, the in-place edit of llama.cpp's buffer-type list, and the
check that runs a kernel against the plain CPU one. These run on any x86 CPU: where there is no AMX,
the same machinery is exercised on CPU_REPACK, the other extra buffer type."""

from __future__ import annotations

import ctypes
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ggufrun.llama import amx, ggml


def _never() -> amx.Check:
    raise AssertionError("the check must not run here")


def test_decide_follows_the_setting_then_the_check() -> None:
    absent = amx.decide(None, False, _never)
    assert (absent.applies, absent.keep, absent.use_extra_bufts) == (False, True, True)
    assert amx.decide("1", True, _never).keep is True
    off = amx.decide("0", True, _never)
    assert (off.applies, off.keep) == (True, False) and "GGUFRUN_AMX_BUFFERS=0" in off.reason
    good = amx.decide(None, True, lambda: amx.Check(True, "logits match"))
    assert good.keep and good.reason == "on: logits match"
    bad = amx.decide("", True, lambda: amx.Check(False, "crashed with SIGSEGV"))
    assert not bad.keep and bad.reason == "off: crashed with SIGSEGV"


def test_verdict_reads_the_comparison() -> None:
    close = {"diffs": {"q4_k_m batch": 2e-3, "q4_0 decode": 0.0}, "amx_used": True}
    assert amx.verdict(close).ok
    far = {"diffs": {"q4_k_m batch": 0.9, "q4_0 decode": 0.0}, "amx_used": True}
    bad = amx.verdict(far)
    assert not bad.ok and "q4_k_m batch 9.0e-01" in bad.detail
    assert amx.verdict({"diffs": {"q4_0 batch": 0.9}, "amx_used": False}).ok  # nothing in AMX: nothing to judge


def test_remove_from_null_terminated_keeps_order_and_terminator() -> None:
    storage = (ctypes.c_void_p * 5)(16, 32, 48, None, 99)
    arr = ctypes.cast(storage, ctypes.POINTER(ctypes.c_void_p))
    assert ggml.remove_from_null_terminated(arr, lambda p: p == 32) == 1
    assert [storage[i] for i in range(5)] == [16, 48, None, None, 99]  # shrinks in place; past the end untouched
    assert ggml.remove_from_null_terminated(arr, lambda p: p == 1234) == 0
    assert ggml.remove_from_null_terminated(arr, lambda p: True) == 2
    assert storage[0] is None


def test_dropping_one_buffer_type_keeps_the_others(tmp_path: Path) -> None:
    # A fresh process: the edit holds for the whole process. The guard runs first, as before every model
    # load (the home holds the session's verdict), so a crashing AMX kernel is never called. Dropping an
    # absent type changes nothing; dropping CPU_REPACK makes llama.cpp load without it, which is what
    # dropping AMX alone relies on.
    code = (
        "import json, sys, pathlib\nfrom ggufrun.llama import amx, ggml\n"
        "amx.ensure()\n"
        "before = ggml.extra_buffer_types()\n"
        "absent = ggml.drop_extra_buffer_type('NO_SUCH_TYPE')\n"
        "dropped = ggml.drop_extra_buffer_type('CPU_REPACK')\n"
        "r = amx.compare(pathlib.Path(sys.argv[1]))\n"
        "print(json.dumps([before, absent, dropped, ggml.extra_buffer_types(), r['buffers']]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, absent, dropped, after, buffers = json.loads(proc.stdout.strip().splitlines()[-1])
    if "CPU_REPACK" not in before:
        pytest.skip(f"this build has no CPU_REPACK buffer type ({before})")
    assert absent is False and dropped is True
    assert after == [b for b in before if b != "CPU_REPACK"]
    assert "CPU_REPACK" not in buffers and buffers  # the weights went to the plain CPU buffer (or AMX, kept)


def test_what_the_guard_keeps_matches_the_plain_kernels(tmp_path: Path) -> None:
    # After the guard, in a child as every test that may reach AMX: where AMX crashes here it is gone and
    # CPU_REPACK is compared with the plain kernels; where AMX passed the check (or the CPU has none) the
    # extra types are compared as kept.
    code = ("import json, sys, pathlib\nfrom ggufrun.llama import amx\n"
            "d = amx.ensure()\nr = amx.compare(pathlib.Path(sys.argv[1]))\n"
            "print(json.dumps([d.applies, d.keep, r]))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    applies, keep, result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["diffs"]) == {"q4_k_m batch", "q4_k_m decode", "q4_0 batch", "q4_0 decode"}
    assert result["amx_used"] == (applies and keep)
    assert amx.verdict(result).ok, result


def _compiler_fills_tile_configs() -> tuple[bool | None, str]:
    """Whether the compiler that built this libggml-cpu fills AMX tile configurations (amx.py says why some
    do not): its amxtileintrin.h where that compiler is installed here, else its version; None if unknown."""
    from llama_cpp._ggml import libggml

    libs = sorted(Path(libggml._name).resolve().parent.glob("libggml-cpu*.so*"))
    found = {m.group(0).decode() for lib in libs[:1] for m in re.finditer(rb"GCC: \([^)\n]*\) \d+\.\d+\.\d+",
                                                                       lib.read_bytes())}
    if len(found) != 1:
        return None, f"built by {sorted(found) or 'an unnamed compiler'}"
    (built_by,) = found
    major, minor = (int(x) for x in built_by.rsplit(" ", 1)[1].split(".")[:2])
    try:
        here = subprocess.run(["gcc", "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
        include = subprocess.run(["gcc", "-print-file-name=include"], capture_output=True, text=True, timeout=30).stdout.strip()
        header = (Path(include) / "amxtileintrin.h").read_text()
    except (OSError, IndexError, subprocess.SubprocessError):
        here, header = "", ""
    if here.replace("gcc ", "GCC: ", 1) == built_by and "_tile_loadconfig" in header:
        body = header[header.index("_tile_loadconfig"):][:400]
        if "__builtin_ia32_ldtilecfg" in body:
            return True, f"{built_by}: _tile_loadconfig is a builtin"
        if '"m" (*((const void **)' in body:
            return False, f"{built_by}: _tile_loadconfig is an asm with a pointer-sized operand"
    if (major, minor) <= (12, 2):
        return False, f"{built_by}: a GCC before the builtin"
    return None, f"{built_by} (not installed here; its header decides)"


def test_the_amx_kernel_crashes_where_the_compiler_miscompiles_it(amx_verdict: amx.Check | None) -> None:
    # The session's check ran the AMX kernel in a child process; here it must have failed exactly where the
    # compiler that built llama.cpp drops the tile configuration's stores (Debian's GCC 12.2 here), and
    # passed where it fills them (GCC 13 on the H100 host). Models in this suite load through the guard.
    if amx_verdict is None:
        pytest.skip("llama.cpp offers no AMX buffer type on this machine (CPU_REPACK is checked above)")
    fills, why = _compiler_fills_tile_configs()
    if fills is None:
        assert amx_verdict.ok or "crashed with SIG" in amx_verdict.detail or "differ" in amx_verdict.detail
        pytest.skip(f"cannot tell how the compiler builds tile configurations ({why}); the check said: "
                    f"{amx_verdict.detail}")
    assert amx_verdict.ok == fills, (why, amx_verdict.detail)
    if not fills:
        assert "crashed with SIG" in amx_verdict.detail or "differ" in amx_verdict.detail, amx_verdict.detail
        assert not amx.ensure().keep  # and the guard dropped AMX in this process


def test_check_runs_once_then_comes_from_the_cache(ggufrun_home: Path, amx_verdict: amx.Check | None) -> None:
    cache = ggufrun_home / "amx-check.json"
    other = {"another install's library": {"ok": False, "detail": "crashed"}}
    cache.write_text(json.dumps(other))
    first = amx.cached_check()  # runs the check in a child process: a crash there is a verdict, not a failure
    assert first.ok == (amx_verdict is None or amx_verdict.ok), first.detail
    entries = json.loads(cache.read_text())
    assert entries.pop("another install's library") == other["another install's library"]  # kept beside ours
    (key,) = entries
    entries[key]["detail"] = "from the cache"
    cache.write_text(json.dumps(entries))
    assert amx.cached_check() == amx.Check(first.ok, "from the cache")


def test_a_crashing_check_turns_amx_off() -> None:
    # A child that dies the way a bad tile configuration kills it (#GP: SIGSEGV).
    crash = [sys.executable, "-c", "import os, signal, sys; open(os.path.join(sys.argv[1], 'model.gguf'), 'w');"
             "print(sys.argv[1], flush=True); os.kill(os.getpid(), signal.SIGSEGV)"]
    result = amx.run_check(argv=crash)
    assert not result.ok and "SIGSEGV" in result.detail
    assert not amx.decide(None, True, lambda: result).keep


def test_a_crashing_check_leaves_no_scratch_folder(tmp_path: Path) -> None:
    # The child dies before any cleanup of its own could run; the folder it wrote into must still go.
    record = tmp_path / "where"
    crash = [sys.executable, "-c", "import os, signal, sys; open(os.path.join(sys.argv[2], 'model.gguf'), 'w');"
             "open(sys.argv[1], 'w').write(sys.argv[2]); os.kill(os.getpid(), signal.SIGSEGV)", str(record)]
    assert not amx.run_check(argv=crash).ok
    scratch = Path(record.read_text())
    assert scratch.name.startswith("ggufrun-amx-") and not scratch.exists()


def test_cpu_backend_names_the_extra_buffers() -> None:
    info = ggml.cpu_backend()
    names = ggml.extra_buffer_types()
    assert info["extra_buffers"] == (" ".join(names) or "none")
    amx_compiled = ggml.cpu_features().get("AMX_INT8") == "1"
    assert ("amx_weight_buffers" in info) == (amx.ensure().applies or amx_compiled)
