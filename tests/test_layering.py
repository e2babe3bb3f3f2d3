"""The architecture rules that keep ggufrun fast to start and easy to reuse as a library."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import ggufrun

CORE = sorted(
    m.name for m in pkgutil.walk_packages(ggufrun.__path__, "ggufrun.")
    if not m.name.startswith("ggufrun.cli")
)
HEAVY = ("llama_cpp", "pandas", "numpy", "modelscope", "huggingface_hub", "matplotlib", "gguf", "rich")


def test_core_never_imports_click_or_rich() -> None:
    code = (
        "import sys; sys.modules['click'] = None; sys.modules['rich'] = None\n"
        f"import importlib\nfor m in {CORE!r}: importlib.import_module(m)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys\nfrom ggufrun.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY=", f"heavy modules imported by --help: {proc.stdout}"


def test_only_runtime_imports_llama_cpp() -> None:
    from pathlib import Path

    root = Path(ggufrun.__file__).parent
    offenders = [
        str(p.relative_to(root)) for p in root.rglob("*.py")
        if p.name != "runtime.py" and "llama" not in p.relative_to(root).parts[:1] and ("import llama_cpp" in p.read_text() or "from llama_cpp" in p.read_text())
    ]
    assert offenders == []
