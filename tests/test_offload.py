"""`--n-gpu-layers auto`: the decision, tested on CPU with a simulated GPU (GGUFRUN_SIMULATE_GPU)
and simulated RAM (GGUFRUN_SIMULATE_RAM), through the library and through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cliutil import run_here

from ggufrun import offload
from ggufrun.errors import ConfigError
from ggufrun.gguf_info import inspect
from ggufrun.llama.devices import Device, gpus, parse_size, real_devices
from ggufrun.settings import Settings, coerce

ROOT = Path(__file__).resolve().parent.parent
GiB = 1024**3


def ggufrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ggufrun.cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=120)


def fake(free: int, total: int = 80 * GiB) -> Device:
    return Device(name="CUDA0", description="FakeGPU 80GB", type="gpu", free=free, total=total)


def test_auto_is_the_default_and_parses() -> None:
    assert Settings().n_gpu_layers == "auto"
    assert coerce("n_gpu_layers", "AUTO") == "auto" and coerce("n_gpu_layers", "7") == 7
    with pytest.raises(ConfigError, match="expected int or auto"):
        coerce("n_gpu_layers", "most")


def test_devices_come_from_llama_cpp() -> None:
    devs = real_devices()
    assert devs and all(d.total > 0 and d.free <= d.total for d in devs)
    assert any(d.type == "cpu" for d in devs)  # the CPU backend is always registered


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_offloads_exactly_the_layers_that_fit(tiny_model: Path, k: int) -> None:
    info = inspect(tiny_model)
    n_layers = info.block_count + 1
    margin = 1 * GiB
    need = info.memory_estimate(1024, n_gpu_layers=k).gpu
    p = offload.plan(info, 1024, devices=[fake(margin + need)], ram=8 * GiB)
    assert p.n_gpu_layers == k
    assert p.describe().startswith(f"{k}/{n_layers} layers on FakeGPU 80GB, ")
    nothing = offload.plan(info, 1024, devices=[fake(margin + need - 1)], ram=8 * GiB)
    assert nothing.n_gpu_layers == max(k - 1, 0)


def test_everything_on_a_big_gpu_and_nothing_without_one(tiny_model: Path) -> None:
    info = inspect(tiny_model)
    assert offload.plan(info, 1024, devices=[fake(70 * GiB)], ram=GiB).n_gpu_layers == info.block_count + 1
    cpu_only = offload.plan(info, 1024, devices=[], ram=GiB)
    assert cpu_only.n_gpu_layers == 0 and cpu_only.devices == ()


def test_cpu_share_beyond_ram_is_refused_with_the_numbers(tiny_model: Path) -> None:
    info = inspect(tiny_model)
    p = offload.plan(info, 1024, devices=[], ram=1000)
    with pytest.raises(offload.DoesNotFitError, match=r"needs .* of RAM at n_ctx 1024 .*but 1.0 KB is available.*--n-ctx"):
        offload.check_ram(p, "tiny")


def test_simulation_variable_is_parsed_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GGUFRUN_SIMULATE_GPU", "name=FakeGPU,total=8GiB,free=6GiB;name=Other,total=4GB")
    assert [(d.name, d.free, d.total) for d in gpus()] == [("FakeGPU", 6 * GiB, 8 * GiB), ("Other", 4 * 10**9, 4 * 10**9)]
    assert parse_size("512MiB", "x") == 512 * 1024**2
    monkeypatch.setenv("GGUFRUN_SIMULATE_GPU", "name=FakeGPU,total=lots")
    with pytest.raises(ConfigError, match="Invalid size 'lots'"):
        gpus()


def test_chat_says_where_the_layers_went(tiny_model: Path) -> None:
    sim = {"GGUFRUN_SIMULATE_GPU": "name=FakeGPU,total=8GiB,free=6GiB"}
    out = ggufrun("chat", str(tiny_model), "-p", "hi", "--max-tokens", "2", "--n-ctx", "256", env=sim)
    assert out.returncode == 0, out.stderr
    assert "layers on FakeGPU, " in out.stderr and " of 8.6 GB" in out.stderr
    quiet = ggufrun("chat", str(tiny_model), "-p", "hi", "--max-tokens", "2", "--n-ctx", "256")
    assert quiet.returncode == 0 and "layers on" not in quiet.stderr  # a CPU-only build: not a word


def test_chat_refuses_before_loading_when_ram_is_short(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Refusals, and show below: in this process (cliutil.run_here), as a process each added only its start."""
    out = run_here(capsys, "chat", str(tiny_model), "-p", "hi", "--n-ctx", "256", env={"GGUFRUN_SIMULATE_RAM": "1KiB"}, text=True)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "of RAM at n_ctx 256" in lines[0] and "1.0 KB is available" in lines[0], out.stderr
    bad = run_here(capsys, "chat", str(tiny_model), "-p", "hi", env={"GGUFRUN_SIMULATE_GPU": "total=8GiB,colour=red"}, text=True)
    assert bad.returncode == 2 and "Invalid GGUFRUN_SIMULATE_GPU entry 'colour=red'" in bad.stderr


def test_show_says_what_auto_would_do(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_here(capsys, "show", str(tiny_model), "--n-ctx", "256", "--json",
                   env={"GGUFRUN_SIMULATE_GPU": "name=FakeGPU,total=8GiB"}, text=True)
    assert out.returncode == 0, out.stderr
    auto = json.loads(out.stdout)["memory"]["auto"]
    info = inspect(tiny_model)
    assert auto["n_gpu_layers"] == info.block_count + 1 and auto["refused"] is None
    table = run_here(capsys, "show", str(tiny_model), "--n-ctx", "256", env={"GGUFRUN_SIMULATE_RAM": "1KiB"}, text=True)
    assert "--n-gpu-layers auto" in table.stdout and "would refuse:" in table.stdout
