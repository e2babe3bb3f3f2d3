"""Any GGUF repo by name: hf:/ms:OWNER/REPO[:QUANT][@REVISION] against the hub emulation, through
the real huggingface_hub and modelscope clients (listing, quant choice, split files, revisions). The commands
run through the real entry point in the test's process (cliutil.run_here)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ggufrun import fetch, registry
from ggufrun.errors import UnknownQuantError
from cliutil import run_here
from hubemu import HubEmu
from test_fetch import make_gguf

REPO = "Org/Multi-GGUF"


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("repo-gguf")
    return {name: make_gguf(root / f"{i}.gguf", n_floats=2_000 + i, seed=i) for i, name in enumerate([
        "multi-Q4_K_M.gguf", "multi-q8_0.gguf", "mmproj-multi-f16.gguf",
        "Q6_K/multi-Q6_K-00001-of-00002.gguf", "Q6_K/multi-Q6_K-00002-of-00002.gguf", "sub/multi-Q4_K_M.gguf"])}


@pytest.fixture
def repo_hub(ggufrun_home: Path, blobs: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> Iterator[HubEmu]:
    with HubEmu() as emu:
        for name, data in blobs.items():
            if name != "sub/multi-Q4_K_M.gguf":
                emu.add("hf", REPO, name, data)
                emu.add("ms", REPO, name, data)
        emu.add("hf", "Org/Sub-GGUF", "multi-Q4_K_M.gguf", blobs["multi-Q4_K_M.gguf"])
        emu.add("hf", "Org/Sub-GGUF", "sub/multi-Q4_K_M.gguf", blobs["sub/multi-Q4_K_M.gguf"])
        emu.add("hf", REPO, "README.md", b"# a model card\n")
        monkeypatch.setenv("GGUFRUN_HF_ENDPOINT", emu.url)
        monkeypatch.setenv("GGUFRUN_MS_ENDPOINT", emu.url)
        monkeypatch.setenv("MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS", "1")
        yield emu


def spec(name: str) -> registry.ModelSpec:
    return registry.load().resolve(name)


@pytest.mark.parametrize("kind", ["hf", "ms"])
def test_default_quant_is_q4_k_m_and_mmproj_is_skipped(repo_hub: HubEmu, blobs: dict[str, bytes], kind: str,
                                                      ggufrun_home: Path) -> None:
    path = fetch.ensure_local(spec(f"{kind}:{REPO}"))
    assert path == ggufrun_home / "models" / kind / "Org--Multi-GGUF" / "multi-Q4_K_M.gguf"
    assert path.read_bytes() == blobs["multi-Q4_K_M.gguf"]
    assert [f.filename for f in fetch.cached()] == ["multi-Q4_K_M.gguf"]  # no mmproj, nothing else
    repo_hub.requests.clear()
    assert fetch.ensure_local(spec(f"{kind}:{REPO}")) == path and repo_hub.requests == []  # the cache answers


def test_quant_is_case_insensitive(repo_hub: HubEmu, blobs: dict[str, bytes]) -> None:
    assert fetch.ensure_local(spec(f"hf:{REPO}:Q8_0")).read_bytes() == blobs["multi-q8_0.gguf"]


def test_missing_quant_lists_the_available_ones(repo_hub: HubEmu, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UnknownQuantError, match="no quant Q5_K_M"):
        fetch.ensure_local(spec(f"hf:{REPO}:q5_k_m"))
    out = run_here(capsys, "pull", f"ms:{REPO}:q5_k_m", text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[0].startswith(f"Error: ms:{REPO}:q5_k_m has no quant Q5_K_M. Available: Q4_K_M, Q6_K, Q8_0.")


@pytest.mark.parametrize("kind", ["hf", "ms"])
def test_every_part_of_a_split_file_and_the_first_is_loaded(repo_hub: HubEmu, blobs: dict[str, bytes], kind: str,
                                                             ggufrun_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_here(capsys, "pull", f"{kind}:{REPO}:q6_k", text=True)
    assert out.returncode == 0, out.stderr
    root = ggufrun_home / "models" / kind / "Org--Multi-GGUF" / "Q6_K"
    for part in ("multi-Q6_K-00001-of-00002.gguf", "multi-Q6_K-00002-of-00002.gguf"):
        assert (root / part).read_bytes() == blobs[f"Q6_K/{part}"]
    assert fetch.ensure_local(spec(f"{kind}:{REPO}:Q6_K"), offline=True) == root / "multi-Q6_K-00001-of-00002.gguf"
    path = run_here(capsys, "path", f"{kind}:{REPO}:Q6_K", text=True)
    assert path.returncode == 0 and path.stdout.strip() == str(root / "multi-Q6_K-00001-of-00002.gguf")
    assert run_here(capsys, "rm", f"{kind}:{REPO}:Q6_K", text=True).returncode == 0 and not root.exists()


def test_revision_is_used_for_listing_and_download(repo_hub: HubEmu, ggufrun_home: Path) -> None:
    path = fetch.ensure_local(spec(f"hf:{REPO}:Q8_0@v1.0"))
    assert path == ggufrun_home / "models" / "hf" / "Org--Multi-GGUF@v1.0" / "multi-q8_0.gguf"
    assert repo_hub.seen("hf", contains=f"/api/models/{REPO}/tree/v1.0")
    assert repo_hub.seen("hf", "HEAD", contains=f"/{REPO}/resolve/v1.0/multi-q8_0.gguf")
    fetch.ensure_local(spec(f"ms:{REPO}:Q8_0@v1.0"))
    assert repo_hub.seen("ms", contains="Revision=v1.0")


def test_same_name_in_another_folder_is_not_cached(repo_hub: HubEmu, blobs: dict[str, bytes],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    top = run_here(capsys, "pull", "hf:Org/Sub-GGUF/multi-Q4_K_M.gguf", text=True)
    sub = run_here(capsys, "pull", "hf:Org/Sub-GGUF/sub/multi-Q4_K_M.gguf", text=True)
    assert top.returncode == 0 and sub.returncode == 0, sub.stderr
    assert "is cached" not in sub.stdout
    assert fetch.ensure_local(spec("hf:Org/Sub-GGUF/sub/multi-Q4_K_M.gguf"), offline=True).read_bytes() == \
        blobs["sub/multi-Q4_K_M.gguf"]


@pytest.mark.parametrize("name", ["hf:Org/Multi GGUF", "hf:Org/../x", "hf:Org/Multi-GGUF@../../x", "ms:Org",
                                  "hf:Org/Multi-GGUF:q4 k"])
def test_bad_repo_names_get_one_line(repo_hub: HubEmu, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_here(capsys, "pull", name, text=True)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) <= 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("Error: Malformed")
