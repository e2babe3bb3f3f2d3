"""`ggufrun lock` and `pull --locked` round trip on the hub emulation: the exact files come back,
and anything that differs (upstream, in the cache, in the lock file) is refused. The commands run through the
real entry point in the test's process (cliutil.run_here)."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from cliutil import run_here
from hubemu import COMMIT, HubEmu
from test_fetch import FILE, HF_REPO, MODELS_TOML, MS_REPO, make_gguf

SPLIT = ["Q6_K/m-Q6_K-00001-of-00002.gguf", "Q6_K/m-Q6_K-00002-of-00002.gguf"]


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("lock-gguf")
    names = [FILE, *SPLIT, "changed"]
    return {n: make_gguf(root / f"{i}.gguf", n_floats=3_000 + i, seed=10 + i) for i, n in enumerate(names)}


@pytest.fixture
def hub(ggufrun_home: Path, blobs: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> Iterator[HubEmu]:
    (ggufrun_home / "models.toml").write_text(MODELS_TOML)
    with HubEmu() as emu:
        emu.add("ms", MS_REPO, FILE, blobs[FILE])
        emu.add("hf", HF_REPO, FILE, blobs[FILE])
        for part in SPLIT:
            emu.add("hf", "Org/Split-GGUF", part, blobs[part])
        monkeypatch.setenv("GGUFRUN_HF_ENDPOINT", emu.url)
        monkeypatch.setenv("GGUFRUN_MS_ENDPOINT", emu.url)
        monkeypatch.setenv("MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS", "1")
        yield emu


def test_lock_round_trip(hub: HubEmu, blobs: dict[str, bytes], ggufrun_home: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    lock_file = tmp_path / "ggufrun.lock"
    out = run_here(capsys, "lock", "tm", "hf:Org/Split-GGUF:q6_k", "-o", str(lock_file), text=True)
    assert out.returncode == 0, out.stderr
    models = tomllib.loads(lock_file.read_text())["model"]
    assert models[0] == {"alias": "tm", "source": "modelscope", "repo": MS_REPO, "revision": "master", "file": FILE,
                         "size": len(blobs[FILE]), "sha256": __import__("hashlib").sha256(blobs[FILE]).hexdigest()}
    assert [(m["alias"], m["file"], m["revision"]) for m in models[1:]] == \
        [("hf:Org/Split-GGUF:q6_k", part, COMMIT) for part in SPLIT]  # a Hugging Face revision pins the commit
    assert not (ggufrun_home / "models").exists()  # the hubs gave every sha256: nothing was downloaded

    pulled = run_here(capsys, "pull", "--locked", str(lock_file), text=True)
    assert pulled.returncode == 0, pulled.stderr
    assert (ggufrun_home / "models" / "tm" / FILE).read_bytes() == blobs[FILE]
    for part in SPLIT:
        assert (ggufrun_home / "models" / "hf" / "Org--Split-GGUF" / part).read_bytes() == blobs[part]
        assert hub.seen("hf", "HEAD", contains=f"/resolve/{COMMIT}/{part}")
    again = run_here(capsys, "pull", "--locked", str(lock_file), text=True)
    assert again.returncode == 0 and again.stdout.count("is cached, as locked") == 3
    assert run_here(capsys, "path", "hf:Org/Split-GGUF:Q6_K", text=True).stdout.strip().endswith(SPLIT[0].split("/")[-1])


def test_locked_pull_refuses_what_differs(hub: HubEmu, blobs: dict[str, bytes], ggufrun_home: Path,
                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lock_file = tmp_path / "ggufrun.lock"
    assert run_here(capsys, "lock", "tm", "-o", str(lock_file), text=True).returncode == 0
    hub.add("ms", MS_REPO, FILE, blobs["changed"])  # upstream changed since the lock
    hub.add("hf", HF_REPO, FILE, blobs["changed"])
    out = run_here(capsys, "pull", "--locked", str(lock_file), text=True)
    assert out.returncode == 1 and not (ggufrun_home / "models" / "tm" / FILE).exists()
    assert "differs" in out.stderr or "lists" in out.stderr, out.stderr

    cached = ggufrun_home / "models" / "tm" / FILE  # a cached file that is not the locked one
    cached.parent.mkdir(parents=True)
    cached.write_bytes(blobs["changed"])
    out = run_here(capsys, "pull", "--locked", str(lock_file), text=True)
    assert out.returncode == 1 and "differs from" in out.stderr and "ggufrun rm tm" in out.stderr

    lock_file.write_text(lock_file.read_text().replace('sha256 = "', 'sha256 = "x'))
    bad = run_here(capsys, "pull", "--locked", str(lock_file), text=True)
    assert bad.returncode == 2 and "sha256 must be 64 hex digits" in bad.stderr
    assert run_here(capsys, "pull", "--locked", str(tmp_path / "absent.lock"), text=True).returncode == 2
