"""KV cache types (-ctk/-ctv): through the settings model into llama.cpp's context, the refusals
llama.cpp would make (checked first, with the flag to change), the memory estimate against what
llama.cpp allocates, and chat, serve, show and bench taking them, on SmolLM2-135M and a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cliutil import run_here
from serverutil import serve

from ggufrun import bench
from ggufrun.bench import report
from ggufrun.errors import BenchUsageError, ConfigError
from ggufrun.gguf_info import inspect
from ggufrun.runtime import Model
from ggufrun.settings import KV_CACHE_TYPES, Settings, coerce

ROOT = str(Path(__file__).resolve().parents[1])
SMALL = dict(n_ctx=256, threads=1, n_gpu_layers=0, batch_size=64, ubatch_size=64)


def ggufrun(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ggufrun.cli.main", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})


def test_the_types_llama_cpp_takes_and_nothing_else() -> None:
    assert KV_CACHE_TYPES == ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")  # llama.cpp's -ctk list
    assert coerce("cache_type_k", "Q8_0") == "q8_0"
    with pytest.raises(ConfigError, match="choose one of f32, f16"):
        coerce("cache_type_v", "q4_k")


@pytest.mark.parametrize("k, v, fa", [("f16", "f16", "off"), ("q8_0", "q8_0", "auto"), ("q4_0", "q4_0", "on"),
                                      ("q8_0", "f16", "off"), ("bf16", "iq4_nl", "auto"), ("f32", "q5_1", "on")])
def test_llama_cpp_allocates_what_the_estimate_says(smollm2_gguf: Path, k: str, v: str, fa: str) -> None:
    """Two sequences of 256 cells: llama.cpp's logged KV buffer and the estimate agree to its 0.01 MiB
    rounding, and the model still answers (a quantized V with flash attention auto: llama.cpp turns it on)."""
    settings = Settings(**SMALL, cache_type_k=k, cache_type_v=v, flash_attn=fa)
    est = inspect(smollm2_gguf).memory_estimate(256, n_gpu_layers=0, cache_types=(k, v), kv_cells=512)
    with Model.load(smollm2_gguf, settings, n_seq_max=2, kv_cells=512) as m:
        assert abs(m.kv_bytes - est.kv_cache) <= 0.005 * (1 << 20) * 2, (m.kv_bytes, est.kv_cache)
        m.decode([(0, m.tokenize("The capital of France is"), True)])
        assert m.logits_rows(1)[0].argmax() == m.tokenize(" Paris", add_special=False)[0]


def test_what_llama_cpp_would_refuse_is_refused_first(smollm2_gguf: Path, tiny_model: Path) -> None:
    with pytest.raises(ConfigError, match="cache_type_v=q8_0 needs flash attention") as err:
        Model.load(smollm2_gguf, Settings(**SMALL, cache_type_v="q8_0", flash_attn="off"))
    assert "--flash-attn auto" in (err.value.hint or "")
    # the tiny model's heads are 16 wide: a block of 32 does not divide them once flash attention is on
    with pytest.raises(ConfigError, match=r"cache_type_k=q4_0 stores blocks of 32 .* head size \(16\)"):
        Model.load(tiny_model, Settings(**SMALL, cache_type_k="q4_0", flash_attn="auto"))
    with Model.load(tiny_model, Settings(**SMALL, cache_type_k="q8_0", flash_attn="off")) as m:  # llama.cpp takes this
        assert m.kv_bytes > 0
    done = ggufrun("chat", str(smollm2_gguf), "-p", "hi", "-ctv", "q4_0", "--flash-attn", "off", "--n-ctx", "256")
    assert done.returncode != 0 and done.stderr.startswith("Error: cache_type_v=q4_0 needs flash attention"), done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 2


def test_chat_and_serve_take_the_short_flags(smollm2_gguf: Path, tiny_model: Path, ggufrun_home: Path) -> None:
    done = ggufrun("chat", str(smollm2_gguf), "-p", "Say hello.", "-ctk", "q8_0", "-ctv", "q8_0", "--n-ctx", "256",
                   "--max-tokens", "8", "--temperature", "0", "--threads", "1")
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    import openai

    with serve(str(tiny_model), "--served-model-name", "t", "--n-ctx", "256", "--threads", "1", "-ctk", "q8_0",
               "--flash-attn", "off", env={"GGUFRUN_HOME": str(ggufrun_home)}) as server:
        oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
        r = oa.chat.completions.create(model="t", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.choices[0].finish_reason in ("stop", "length")
    # refused as the model loads at start-up: the server exits with llama.cpp's reason and the fix
    done = ggufrun("serve", str(tiny_model), "--n-ctx", "256", "--threads", "1", "-ctk", "q4_0", "--port", "0")
    assert done.returncode != 0 and "Error: cache_type_k=q4_0 stores blocks of 32" in done.stderr, done.stderr


def test_show_estimates_the_kv_cache_of_the_types(smollm2_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`show` reads the header: in this process (cliutil.run_here), as a process each added only its start."""
    info = inspect(smollm2_gguf)
    q8 = json.loads(run_here(capsys, "show", str(smollm2_gguf), "--n-ctx", "4096", "--json", "-ctk", "q8_0", "-ctv", "q4_0",
                             text=True).stdout)["memory"]
    assert (q8["cache_type_k"], q8["cache_type_v"]) == ("q8_0", "q4_0")
    per_type = 4096 * info.block_count * info.head_count_kv * info.key_length  # elements of K (and of V)
    assert info.memory_estimate(4096, n_gpu_layers=0).kv_cache == per_type * 4  # f16: 2 bytes each
    assert q8["cpu_only"]["kv_cache"] == int(per_type * (34 / 32 + 18 / 32))
    table = run_here(capsys, "show", str(smollm2_gguf), "-ctk", "q8_0", "-ctv", "q8_0", text=True).stdout
    assert "KV cache (q8_0)" in table


def test_bench_sweeps_cache_types_side_by_side(smollm2_gguf: Path) -> None:
    targets = bench.resolve_targets(str(smollm2_gguf), [])
    base = Settings(threads=1)
    configs = bench.plan(targets, {"cache_types": ["f16", "q8_0"]}, base, 16, 4)
    assert [(c.cache_type_k, c.cache_type_v) for c in configs] == [("f16", "f16"), ("q8_0", "q8_0")]
    crossed = bench.plan(targets, {"cache_type_k": ["f16", "q8_0"], "cache_type_v": ["q4_0"]}, base, 16, 4)
    assert [(c.cache_type_k, c.cache_type_v) for c in crossed] == [("f16", "q4_0"), ("q8_0", "q4_0")]
    with pytest.raises(BenchUsageError, match="not both"):
        bench.plan(targets, {"cache_types": ["f16"], "cache_type_k": ["q8_0"]}, base, 16, 4)
    run = bench.BenchRun(n_prompt=16, n_gen=4, reps=1, results=[bench.Result(configs[1], kv_bytes=1 << 20)])
    headers, cells = report.display(run)
    assert (cells[0][headers.index("ctk")], cells[0][headers.index("KV cache")]) == ("q8_0", "1.00 MiB")


@pytest.mark.slow
def test_bench_measures_each_cache_type(smollm2_gguf: Path) -> None:
    """A real sweep through the CLI: worker processes report llama.cpp's KV bytes per type."""
    done = ggufrun("bench", str(smollm2_gguf), "--cache-types", "f16,q4_0", "-p", "16", "-n", "4", "-r", "1",
                   "--threads", "1", "--n-ctx", "1024", "--no-quality", "--format", "json")
    assert done.returncode == 0, done.stderr
    rows = {r["cache_type_k"]: r for r in json.loads(done.stdout)["rows"]}
    assert [rows[t]["cache_type_v"] for t in ("f16", "q4_0")] == ["f16", "q4_0"]
    assert all(rows[t]["pp_tps"] > 0 and rows[t]["tg_tps"] > 0 and rows[t]["peak_rss_bytes"] > 0 for t in rows)
    assert abs(rows["q4_0"]["kv_bytes"] / rows["f16"]["kv_bytes"] - 18 / 64) < 0.01


def test_a_server_keeps_models_by_the_memory_their_cache_types_take(smollm2_gguf: Path) -> None:
    """Residency by memory (serve's lifecycle) counts a quantized cache at its own size: all the slots' cells."""
    from ggufrun.server.lifecycle import estimate

    info = inspect(smollm2_gguf)
    f16 = estimate(info, 4 * 2048, 0, 2048)
    q8 = estimate(info, 4 * 2048, 0, 2048, ("q8_0", "q8_0"))
    assert f16.kv_cache == 4 * 2048 * info.block_count * info.head_count_kv * info.key_length * 4
    assert q8.kv_cache == int(f16.kv_cache * 34 / 64) and q8.weights == f16.weights and q8.total < f16.total
