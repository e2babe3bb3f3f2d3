"""Fit checked before download: the GGUF header read from the hub with range requests (both hubs),
`show` without downloading, and a file that cannot run here refused before its body is fetched. The commands
run through the real entry point in the test's process (cliutil.run_here): they read headers or refuse."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ggufrun import fetch, registry
from ggufrun.gguf_info import inspect
from cliutil import run_here
from hubemu import HubEmu
from test_fetch import make_gguf

REPO = "Org/Big-GGUF"
FILE = "big-Q4_K_M.gguf"


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("big") / FILE
    return path, make_gguf(path, n_floats=4_000_000)  # 16 MB of tensor data behind a tiny header


@pytest.fixture
def big_hub(big: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> Iterator[HubEmu]:
    with HubEmu() as emu:
        emu.add("hf", REPO, FILE, big[1])
        emu.add("ms", REPO, FILE, big[1])
        monkeypatch.setenv("GGUFRUN_HF_ENDPOINT", emu.url)
        monkeypatch.setenv("GGUFRUN_MS_ENDPOINT", emu.url)
        monkeypatch.setenv("MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS", "1")
        yield emu


@pytest.mark.parametrize("kind", ["hf", "ms"])
def test_header_is_range_read_from_either_hub(big_hub: HubEmu, big: tuple[Path, bytes], kind: str) -> None:
    info, served = fetch.remote_info(registry.load().resolve(f"{kind}:{REPO}:q4_k_m"))
    local = inspect(big[0])
    assert (info.n_tensors, info.tensor_bytes, info.file_size, info.architecture) == \
        (local.n_tensors, local.tensor_bytes, local.file_size, local.architecture)
    assert served == big_hub.header_bytes(FILE) and served <= len(big[1]) // 10
    assert big_hub.body_requests(FILE) == []


def test_show_reads_the_header_without_downloading(big_hub: HubEmu, big: tuple[Path, bytes], ggufrun_home: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = run_here(capsys, "show", f"hf:{REPO}:Q4_K_M", "--json", text=True)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["tensor_bytes"] == inspect(big[0]).tensor_bytes and "auto" in shown["memory"]
    assert not (ggufrun_home / "models").exists()
    assert big_hub.body_requests(FILE) == [] and big_hub.header_bytes(FILE) <= len(big[1]) // 10
    table = run_here(capsys, "show", f"ms:{REPO}", text=True)
    assert table.returncode == 0 and "not in the cache: header read from the hub" in table.stdout


def test_pull_refuses_what_cannot_run_here_and_force_pulls_anyway(big_hub: HubEmu, big: tuple[Path, bytes],
                                                                    ggufrun_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tight = {"GGUFRUN_SIMULATE_RAM": "1MiB"}
    out = run_here(capsys, "pull", f"hf:{REPO}", env=tight, text=True)
    assert out.returncode == 1, out.stderr
    line = out.stderr.strip().splitlines()[0]
    assert "needs" in line and "of RAM at n_ctx" in line and "1.0 MB is available" in line and "--force" in line
    assert big_hub.body_requests(FILE) == [] and not (ggufrun_home / "models").exists()
    forced = run_here(capsys, "pull", "--force", f"hf:{REPO}", env=tight, text=True)
    assert forced.returncode == 0, forced.stderr
    assert (ggufrun_home / "models" / "hf" / "Org--Big-GGUF" / FILE).read_bytes() == big[1]


def test_chat_refuses_before_downloading(big_hub: HubEmu, ggufrun_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_here(capsys, "chat", f"ms:{REPO}", "-p", "hi", env={"GGUFRUN_SIMULATE_RAM": "1MiB"}, text=True)
    assert out.returncode == 1 and "of RAM at n_ctx" in out.stderr
    assert big_hub.body_requests(FILE) == [] and not (ggufrun_home / "models").exists()


def test_a_file_that_fits_is_pulled_after_one_header_read(big_hub: HubEmu, big: tuple[Path, bytes]) -> None:
    result = fetch.pull(registry.load().resolve(f"ms:{REPO}"))
    assert result.path.read_bytes() == big[1]
    assert len(big_hub.header_reads(FILE)) == 1 and len(big_hub.body_requests(FILE)) == 1
