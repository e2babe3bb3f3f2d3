"""rm and pull touch nothing outside the model cache, whatever a models.toml name, a file name or a
symlink under the cache says (a "../../victim" entry reached through an alias made rm delete a file
outside the cache and remove its folder). Everything here lives in the test's tmp folder."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
from cliutil import run_here

from ggufrun import cache
from ggufrun.errors import ConfigError


@pytest.fixture()
def ggufrun(capsys: pytest.CaptureFixture[str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """rm, pull and path through the real entry point in the test's process (cliutil.run_here): they refuse or
    remove a folder before anything else, and a process each added ~0.5 s of CPU to start."""
    return lambda *args: run_here(capsys, *args, text=True)


def entry(name: str, file: str = "victim.gguf", alias: str = "innocent") -> str:
    return (f'[{name!r}]\nquants = ["q4_0"]\nfile = "{file}"\naliases = ["{alias}"]\n'
            'sources = [{ hub = "huggingface", repo = "org/repo" }]\n').replace("'", '"')


@pytest.fixture()
def victim(tmp_path: Path, ggufrun_home: Path) -> Path:
    """A file outside the cache that a hostile name points at: GGUFRUN_HOME/models/../../victim.gguf."""
    outside = ggufrun_home.parent / "victim.gguf"
    outside.write_bytes(b"precious")
    return outside


def _refused(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 2, proc.stderr
    # refused when models.toml is read (an unsafe file name) or when the path is resolved
    assert ("outside the model cache" in proc.stderr or "Unsafe" in proc.stderr) and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("command", ["rm", "pull", "path"])
def test_a_dotdot_registry_name_reached_through_an_alias_is_refused(command: str, victim: Path,
                                                                   ggufrun_home: Path, ggufrun: Callable[..., Any]) -> None:
    (ggufrun_home / "models.toml").write_text(entry("../..", "victim.gguf"))
    (ggufrun_home / "models").mkdir()
    _refused(ggufrun(command, "innocent"))
    assert victim.read_bytes() == b"precious" and victim.parent.is_dir()


@pytest.mark.parametrize("file", ["../../victim.gguf", "/{victim}"])
def test_a_file_name_that_climbs_out_is_refused(file: str, victim: Path, ggufrun_home: Path, ggufrun: Callable[..., Any]) -> None:
    (ggufrun_home / "models.toml").write_text(entry("tm", file.format(victim=victim)))
    _refused(ggufrun("rm", "innocent"))
    assert victim.read_bytes() == b"precious"


def test_a_symlinked_model_folder_is_refused(victim: Path, ggufrun_home: Path, ggufrun: Callable[..., Any]) -> None:
    (ggufrun_home / "models").mkdir()
    (ggufrun_home / "models" / "tm").symlink_to(victim.parent, target_is_directory=True)
    (ggufrun_home / "models.toml").write_text(entry("tm", "victim.gguf"))
    _refused(ggufrun("rm", "innocent"))
    _refused(ggufrun("pull", "innocent"))
    assert victim.read_bytes() == b"precious"


def test_a_symlinked_model_file_is_refused(victim: Path, ggufrun_home: Path, ggufrun: Callable[..., Any]) -> None:
    (ggufrun_home / "models" / "tm").mkdir(parents=True)
    (ggufrun_home / "models" / "tm" / "victim.gguf").symlink_to(victim)
    (ggufrun_home / "models.toml").write_text(entry("tm", "victim.gguf"))
    _refused(ggufrun("rm", "innocent"))
    assert victim.read_bytes() == b"precious"


def test_a_cache_moved_by_a_symlink_still_works(tmp_path: Path, ggufrun_home: Path, ggufrun: Callable[..., Any]) -> None:
    """Symlinking the whole models folder to a bigger disk is legitimate: inside is judged after
    resolving both sides."""
    disk = tmp_path / "big-disk"
    (disk / "tm").mkdir(parents=True)
    (disk / "tm" / "victim.gguf").write_bytes(b"mine")
    (ggufrun_home / "models").symlink_to(disk, target_is_directory=True)
    (ggufrun_home / "models.toml").write_text(entry("tm", "victim.gguf"))
    proc = ggufrun("rm", "innocent")
    assert proc.returncode == 0, proc.stderr
    assert not (disk / "tm").exists() and disk.is_dir()


def test_staging_and_placing_refuse_outside_paths(tmp_path: Path, ggufrun_home: Path) -> None:
    staged = tmp_path / "staged.gguf"
    staged.write_bytes(b"x")
    for target in (ggufrun_home / "models" / ".." / "x.gguf", tmp_path / "elsewhere.gguf"):
        with pytest.raises(ConfigError):
            cache.place(staged, target)
        with pytest.raises(ConfigError):
            cache.staging_dir(target, "huggingface")
        with pytest.raises(ConfigError):
            cache.remove(target)
    assert staged.exists() and not (tmp_path / "elsewhere.gguf").exists()
