"""ggufrun bench and ggufrun quantize: real runs on tiny synthetic models and on gemma3-270m."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cliutil import run_here

from ggufrun import bench
from ggufrun.bench import report
from ggufrun.quantize import quantized_name
from ggufrun.settings import Settings
from ggufrun.synthetic import write_synthetic
from sse_server import SSEServer

FAST = ["-p", "32", "-n", "16", "-r", "2"]
ROOT = str(Path(__file__).resolve().parents[1])
BASE = Settings(threads=1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    for quant in ("f16", "q8_0"):
        write_synthetic(folder / f"tiny-{quant}.gguf", shape="tiny", quant=quant)
    return folder


@pytest.fixture(scope="module")
def sweep_run(tiny_dir: Path) -> bench.BenchRun:
    """A 2x2 sweep (batch size x flash-attn) of one tiny model, measured once for several tests.
    Not threads: a second llama.cpp thread per worker only spins against the suite's other workers
    on a small machine (a 2-thread configuration took 3-11 s here instead of 0.5)."""
    targets = bench.resolve_targets(str(tiny_dir / "tiny-q8_0.gguf"), [])
    configs = bench.plan(targets, {"batch_size": [16, 32], "flash_attn": ["on", "off"]}, BASE, 32, 16)
    return bench.run_bench(configs, base=BASE, n_prompt=32, n_gen=16, reps=2)


@pytest.fixture(scope="module")
def plain_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny files without the name that marks them synthetic, so that bench scores their quality."""
    folder = tmp_path_factory.mktemp("plain")
    for src in tiny_dir.glob("*.gguf"):
        data = src.read_bytes()
        assert data.count(b"ggufrun synthetic ") == 1
        (folder / src.name).write_bytes(data.replace(b"ggufrun synthetic ", b"ggufrun plainfile "))
    return folder


@pytest.fixture
def plain_entry(plain_dir: Path, ggufrun_home: Path) -> str:
    """A user registry entry with one quant, q8_0, in the cache (no download)."""
    (ggufrun_home / "models.toml").write_text('[plaintiny]\nquants = ["q8_0"]\nfile = "tiny-{quant}.gguf"\n'
                                              'sources = [{hub = "huggingface", repo = "nobody/tiny"}]\n')
    cached = ggufrun_home / "models" / "plaintiny" / "tiny-q8_0.gguf"
    cached.parent.mkdir(parents=True)
    cached.write_bytes((plain_dir / "tiny-q8_0.gguf").read_bytes())
    return "plaintiny"


def ggufrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own: its real exit status and output."""
    return subprocess.run([sys.executable, "-m", "ggufrun.cli.main", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                                            **(env or {})})


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``ggufrun ARGS`` in this process (cliutil.run_here)."""
    done = run_here(capsys, *args, text=True)
    return done.returncode, done.stdout, done.stderr


def test_sweep_of_2x2_gives_4_measured_rows(sweep_run: bench.BenchRun) -> None:
    data = report.rows(sweep_run)
    assert len(data) == 4
    assert {(r["batch_size"], r["flash_attn"]) for r in data} == {(16, "on"), (16, "off"), (32, "on"), (32, "off")}
    for row, result in zip(data, sweep_run.results):
        assert row["error"] == ""
        assert row["pp_tps"] > 0 and row["tg_tps"] > 0 and row["load_s"] > 0
        assert row["peak_rss_bytes"] > 10 * 2**20 and row["file_bytes"] > 0
        assert row["quality_note"] == bench.SYNTHETIC_NOTE
        # raw rows: 2 repetitions of each test; the mean is derived from them
        assert [(s.test, s.rep) for s in result.samples] == [("pp", 0), ("pp", 1), ("tg", 0), ("tg", 1)]
        rates = [32 / s.seconds for s in result.samples if s.test == "pp"]
        assert row["pp_tps"] == pytest.approx(sum(rates) / 2, rel=1e-3)


def test_every_format_parses_and_holds_the_columns(sweep_run: bench.BenchRun, tmp_path: Path) -> None:
    table = list(csv.DictReader(io.StringIO(report.to_csv(sweep_run))))
    assert len(table) == 4 and set(table[0]) == set(report.COLUMNS)
    doc = json.loads(report.to_json(sweep_run))
    assert len(doc["rows"]) == 4 and set(doc["rows"][0]) == set(report.COLUMNS)
    assert len(doc["samples"]) == 16
    env = doc["environment"]
    assert env["cpu"] and env["cpu_cores_logical"] >= 1 and env["ggufrun"] and env["time"]
    assert "CPU" in env["llama_cpp_system_info"]
    md = report.to_markdown(sweep_run).splitlines()
    assert md[0].startswith("| model ") and "pp32 t/s" in md[0] and "tg16 t/s" in md[0]
    assert len([line for line in md if line.startswith("| ")]) == 5  # header + 4 rows
    written = report.write(sweep_run, tmp_path / "out")
    names = {p.name for p in written}
    assert {"bench.csv", "bench.json", "bench.md", "samples.csv", "tokens_per_s.png", "memory.png"} <= names
    for p in written:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_failing_configurations_are_rows_with_reasons(capsys: pytest.CaptureFixture[str], tiny_dir: Path) -> None:
    # n_ctx beyond the model's trained length fails to load; the other configuration still runs
    code, out, _ = run_cli(capsys, "bench", str(tiny_dir / "tiny-q8_0.gguf"), *FAST, "--n-ctx", "64,99999999",
                           "--threads", "1", "--format", "json", "--no-quality")
    assert code == 1  # the measured row is shown, and a script still sees that one failed
    rows = json.loads(out)["rows"]
    assert [bool(r["error"]) for r in rows] == [False, True]
    assert "trained context" in rows[1]["error"] and rows[1]["pp_tps"] is None


def test_unknown_quants_are_refused_before_anything_is_measured(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                                ggufrun_home: Path) -> None:
    (ggufrun_home / "models.toml").write_text("[broken\n")  # --synthetic reads no registry
    code, out, err = run_cli(capsys, "bench", "--synthetic", "tiny", "--quants", "q8_0,q9_z,q7_x", *FAST)
    assert code == 2 and out == ""
    assert err == "Error: Synthetic models have no quant type q9_z, q7_x. Nothing was measured.\n"
    assert not (ggufrun_home / "synthetic").exists()  # q8_0 was not even written: nothing was measured


def test_a_registry_models_missing_quant_is_refused_with_what_it_has(capsys: pytest.CaptureFixture[str], plain_entry: str) -> None:
    code, out, err = run_cli(capsys, "bench", plain_entry, "--quants", "q8_0,q5_k_m", *FAST)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"Error: {plain_entry} has no quant q5_k_m. Nothing was measured. It has q8_0; "
                                        "--derive-from QUANT makes others with llama.cpp's quantiser."]
    code, _, err = run_cli(capsys, "bench", plain_entry, "--quants", "q8_0,q9_z", "--derive-from", "q8_0", *FAST)
    assert code == 2
    assert err.startswith(f"Error: {plain_entry} has no quant q9_z, and llama.cpp's quantiser cannot make it.")


@pytest.mark.parametrize("args, message", [
    ((), "Error: Give a model name or file, or --synthetic SHAPE."),
    (("--synthetic", "tiny", "-r", "0"), "Error: -r must be >= 1 (got 0)."),
    (("--synthetic", "tiny", "--threads", ","), "Error: Empty list for --threads."),
    (("--url", "http://127.0.0.1:9"), "Error: --url needs --model NAME"),
    (("--url", "http://127.0.0.1:9", "--model", "m", "--concurrency", "1,x"), "Error: Invalid --concurrency"),
])
def test_bench_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str) -> None:
    code, _, err = run_cli(capsys, "bench", *args)
    assert code == 2 and err.startswith(message), err
    assert len(err.splitlines()) == 1


def test_one_file_has_no_quality_to_measure(capsys: pytest.CaptureFixture[str], plain_dir: Path, tmp_path: Path) -> None:
    # Scored against itself it would get KL 0 and a quality plot: there is nothing to compare it with.
    code, out, err = run_cli(capsys, "bench", str(plain_dir / "tiny-q8_0.gguf"), "-p", "16", "-n", "4", "-r", "1",
                             "--threads", "1", "--format", "json", "-o", str(tmp_path / "res"))
    assert code == 0, err
    doc = json.loads(out)
    (row,) = doc["rows"]
    assert row["quality_note"] == bench.NO_REFERENCE_NOTE and row["kl_divergence"] is None
    assert any(n.startswith("Quality not measured: tiny-q8_0.gguf is the only file") for n in doc["notes"])
    assert "Quality not measured" in err
    assert not (tmp_path / "res" / "quality.png").exists() and (tmp_path / "res" / "tokens_per_s.png").exists()


@pytest.mark.slow  # three quantisations and two bench runs (seconds on 2 cores): the derived-reference rule runs in the slow suite
def test_a_derived_file_is_not_the_silent_reference(plain_entry: str, ggufrun_home: Path,
                                                    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # f16 made from q8_0 is the larger file, but it holds no more than q8_0: q8_0 is the reference, and bench says so.
    proc = ggufrun("bench", plain_entry, "--quants", "q8_0,f16", "--derive-from", "q8_0", "-p", "16", "-n", "4",
                   "-r", "1", "--threads", "1", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    by_quant = {r["quant"]: r for r in doc["rows"]}
    assert by_quant["f16"]["model"] == f"{plain_entry}:f16 (derived)"
    assert {r["quality_reference"] for r in doc["rows"]} == {f"{plain_entry}:q8_0"}
    assert by_quant["q8_0"]["kl_divergence"] == 0 and by_quant["f16"]["kl_divergence"] is not None
    cached = ggufrun_home / "models" / plain_entry / "tiny-q8_0.gguf"
    note = f"Quality reference: {plain_entry}:q8_0 ({cached}), the largest file not derived from another."
    assert note in doc["notes"] and note in proc.stderr
    # Named as the reference, the derived file is announced as what it is.
    derived = ggufrun_home / "derived" / plain_entry / f"{plain_entry}-f16.gguf"
    proc = ggufrun("bench", plain_entry, "--quants", "q8_0,f16", "--derive-from", "q8_0", "-p", "16", "-n", "4",
                   "-r", "1", "--threads", "1", "--format", "json", "--reference", str(derived))
    assert proc.returncode == 0, proc.stderr
    assert (f"Quality reference: {plain_entry}:f16 (derived) ({derived}), derived from q8_0 by llama.cpp's quantiser: "
            "it holds no more than that file does.") in json.loads(proc.stdout)["notes"]
    # and `list` shows it, with what it was made from
    listing = json.loads(run_cli(capsys, "list", "--json")[1])
    assert {"path": str(derived), "size": derived.stat().st_size, "derived_from": str(cached.resolve()),
            "synthetic": False} in listing["derived"]
    monkeypatch.setenv("COLUMNS", "300")
    assert "Made by bench (1)" in run_cli(capsys, "list")[1]


def test_a_spread_over_five_percent_is_flagged_as_noise(tiny_dir: Path) -> None:
    target = bench.Target(label="t", quant="q8_0", path=tiny_dir / "tiny-q8_0.gguf")
    (config,) = bench.plan([target], {}, BASE, 100, 10)
    steady = bench.Result(config, samples=[bench.Sample("pp", i, 100, s) for i, s in enumerate((1.0, 1.01, 0.99))])
    noisy = bench.Result(config, samples=[bench.Sample("tg", i, 10, s) for i, s in enumerate((1.0, 1.6, 0.7))])
    assert bench.noise_notes([steady]) == []
    (note,) = bench.noise_notes([steady, noisy])
    assert note.startswith(f"Noisy machine: 1 of 2 configurations varied by more than 5% between repetitions "
                           f"({config.describe()}: tg ±") and note.endswith("rerun when it is quiet.")


def test_cli_output_dir_and_table(capsys: pytest.CaptureFixture[str], tiny_dir: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # rich's width when stdout is not a terminal
    code, out, _ = run_cli(capsys, "bench", str(tiny_dir / "tiny-q8_0.gguf"), *FAST, "--threads", "1",
                           "--no-quality", "-o", str(tmp_path / "res"))
    assert code == 0
    assert "pp32 t/s" in out and "tiny-q8_0.gguf" in out
    assert (tmp_path / "res" / "bench.json").exists() and (tmp_path / "res" / "tokens_per_s.png").exists()


def test_bad_sweep_value_is_one_line_error(capsys: pytest.CaptureFixture[str], tiny_dir: Path) -> None:
    code, _, err = run_cli(capsys, "bench", str(tiny_dir / "tiny-q8_0.gguf"), "--flash-attn", "on,maybe")
    assert code != 0 and err.startswith("Error: Invalid flash_attn='maybe'")
    code, _, err = run_cli(capsys, "bench")
    assert code != 0 and err.startswith("Error: Give a model name")


def test_ctrl_c_keeps_measured_rows(tiny_dir: Path) -> None:
    targets = bench.resolve_targets(str(tiny_dir / "tiny-q8_0.gguf"), [])
    configs = bench.plan(targets, {"threads": [1, 1, 1]}, BASE, 16, 8)

    def progress(done: int, total: int, what: str) -> None:
        if done == 1:  # what SIGINT does in the main thread while the second config starts
            raise KeyboardInterrupt

    run = bench.run_bench(configs, base=BASE, n_prompt=16, n_gen=8, reps=1, progress=progress)
    assert run.interrupted and len(run.results) == 1 and run.results[0].ok
    assert "Interrupted" in report.to_markdown(run)


def test_quality_against_reference(tiny_dir: Path, tmp_path: Path) -> None:
    """KL, top-1 and perplexity computed from the real logits of two files (marked non-synthetic
    here to exercise the maths; synthetic runs report n/a)."""
    text = tmp_path / "t.txt"
    text.write_text(Path(bench.DEFAULT_TEXT).read_text()[:1500])
    targets = [bench.Target(label=q, quant=q, path=tiny_dir / f"tiny-{q}.gguf") for q in ("f16", "q8_0")]
    configs = bench.plan(targets, {}, BASE, 8, 4)
    run = bench.run_bench(configs, base=BASE, n_prompt=8, n_gen=4, reps=1, text=text, quality_ctx=64)
    ref, q8 = run.quality["f16"], run.quality["q8_0"]
    assert ref.reference == "f16" == q8.reference  # the largest file is the reference
    assert ref.kl_divergence == pytest.approx(0.0, abs=1e-6) and ref.top1_agreement == 1.0
    assert q8.kl_divergence is not None and q8.kl_divergence >= 0 and 0 <= q8.top1_agreement <= 1
    assert ref.tokens > 0 and ref.perplexity > 1 and q8.perplexity > 1


def test_quantize_makes_smaller_files_that_load(capsys: pytest.CaptureFixture[str], tiny_dir: Path, tmp_path: Path) -> None:
    from ggufrun.runtime import Model

    src = tiny_dir / "tiny-f16.gguf"
    code, out, _ = run_cli(capsys, "quantize", str(src), "--to", "q4_0,q8_0", "--out-dir", str(tmp_path))
    assert code == 0
    made = [Path(line.split("\t")[2]) for line in out.splitlines()]
    assert [p.name for p in made] == ["tiny-q4_0.gguf", "tiny-q8_0.gguf"]
    assert made[0].stat().st_size < made[1].stat().st_size < src.stat().st_size
    for path in made:
        with Model.load(path, BASE.updated({"n_ctx": 64}, "test")) as model:
            assert model.decode([(0, [1, 2, 3], True)]) == [2]
    code, _, err = run_cli(capsys, "quantize", str(src), "--to", "q9_z")
    assert code != 0 and err.startswith("Error: Unknown quant type(s): q9_z.")


def test_derive_from_a_local_file(tiny_dir: Path) -> None:
    targets = bench.resolve_targets(str(tiny_dir / "tiny-f16.gguf"), ["q4_0"])
    assert len(targets) == 1 and not targets[0].error
    assert targets[0].path is not None and targets[0].path.stat().st_size < (tiny_dir / "tiny-f16.gguf").stat().st_size
    assert targets[0].synthetic


def test_registry_defaults_apply_and_flags_override(capsys: pytest.CaptureFixture[str], tiny_dir: Path,
                                                    ggufrun_home: Path) -> None:
    """Defect 11: bench measures a registry model with its [defaults], as chat and serve do."""
    (ggufrun_home / "models.toml").write_text(
        '[tinydef]\nquants = ["q8_0"]\nfile = "tiny-{quant}.gguf"\n'
        'sources = [{hub = "huggingface", repo = "nobody/tiny"}]\n'
        '[tinydef.defaults]\nthreads = 1\nbatch_size = 16\nflash_attn = "off"\n')
    cached = ggufrun_home / "models" / "tinydef" / "tiny-q8_0.gguf"  # in the cache: no download
    cached.parent.mkdir(parents=True)
    cached.write_bytes((tiny_dir / "tiny-q8_0.gguf").read_bytes())
    code, out, _ = run_cli(capsys, "bench", "tinydef", "-p", "32", "-n", "4", "-r", "1", "--no-quality", "--format", "json")
    assert code == 0
    (row,) = json.loads(out)["rows"]
    assert (row["threads"], row["batch_size"], row["flash_attn"], row["error"]) == (1, 16, "off", "")
    code, out, _ = run_cli(capsys, "bench", "tinydef", "-p", "32", "-n", "4", "-r", "1", "--no-quality", "--format", "json",
                           "--batch-size", "32")
    (row,) = json.loads(out)["rows"]
    assert (row["threads"], row["batch_size"]) == (1, 32)


def test_quant_comparison_pivot(tiny_dir: Path) -> None:
    """Quants side by side: one row per file, smallest first, speed under each swept setting."""
    targets = [bench.Target(label=q, quant=q, path=tiny_dir / f"tiny-{q}.gguf", synthetic=True) for q in ("f16", "q8_0")]
    configs = bench.plan(targets, {"n_ctx": [16, 32]}, BASE, 8, 4)  # not threads: see sweep_run
    run = bench.run_bench(configs, base=BASE, n_prompt=8, n_gen=4, reps=1)
    table = report.quant_comparison(run)
    assert list(table["quant"]) == ["q8_0", "f16"]  # by file size
    assert {"pp t/s n_ctx=16", "pp t/s n_ctx=32", "tg t/s n_ctx=16", "tg t/s n_ctx=32"} <= set(table.columns)
    assert (table["tg t/s n_ctx=32"] > 0).all()
    assert "Quants side by side" in report.to_markdown(run)


def test_quantized_name() -> None:
    assert quantized_name(Path("gemma-3-270m-q4_k_m.gguf"), "q8_0") == "gemma-3-270m-q8_0.gguf"
    assert quantized_name(Path("model.gguf"), "q4_0") == "model-q4_0.gguf"


def test_load_mode_against_a_real_server(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with SSEServer() as server:
        code, out, _ = run_cli(capsys, "bench", "--url", server.url, "--model", "m", "--concurrency", "1,2",
                               "--requests", "4", "--max-tokens", "8", "--format", "json", "-o", str(tmp_path))
    assert code == 0
    levels = json.loads(out)["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    assert all(lv["errors"] == 0 and lv["tokens"] == 32 for lv in levels)
    assert (tmp_path / "load.csv").exists() and (tmp_path / "load.png").exists()


@pytest.mark.slow  # the real 253 MB file (~4 s of CPU); a registry name is benched from the cache in the default suite by
# test_registry_defaults_apply_and_flags_override (a tiny model)
def test_gemma_bench_by_name(capsys: pytest.CaptureFixture[str], gemma_in_cache: Path) -> None:
    code, out, _ = run_cli(capsys, "bench", "gemma3-270m", *FAST, "--threads", "1", "--format", "csv", "--no-quality")
    assert code == 0
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert row["model"] == "gemma3-270m:q4_k_m" and row["error"] == ""
    assert float(row["pp_tps"]) > 0 and float(row["tg_tps"]) > 0


@pytest.mark.slow
def test_gemma_quality_against_a_derived_quant(capsys: pytest.CaptureFixture[str], gemma_in_cache: Path) -> None:
    """q8_0 is not published for gemma3-270m: derived from q4_k_m, then compared with it."""
    code, out, _ = run_cli(capsys, "bench", "gemma3-270m", "--quants", "q4_k_m,q8_0", "--derive-from", "q4_k_m",
                           *FAST, "--threads", "1", "--format", "json")
    assert code == 0
    rows = json.loads(out)["rows"]
    assert [r["error"] for r in rows] == ["", ""]
    by_quant = {r["quant"]: r for r in rows}
    # q8_0 made from q4_k_m holds no more than q4_k_m: the file it came from is the reference
    assert by_quant["q4_k_m"]["kl_divergence"] == 0 and by_quant["q8_0"]["kl_divergence"] >= 0
    assert {r["quality_reference"] for r in rows} == {"gemma3-270m:q4_k_m"}
    assert 5 < by_quant["q8_0"]["perplexity"] < 200


def test_only_the_worker_touches_the_llama_boundary() -> None:
    """The parent side never loads llama.cpp: only bench/worker.py imports the runtime."""
    folder = Path(bench.__file__).parent
    touching = sorted(p.name for p in folder.glob("*.py") if "runtime" in p.read_text() and "import" in p.read_text())
    assert touching == ["worker.py"]


def test_cli_speculative_columns_against_the_same_model_without(capsys: pytest.CaptureFixture[str], tiny_dir: Path) -> None:
    # --draft-model (here the target itself: every greedy draft token is the target's own) and
    # --spec ngram each add acceptance and speedup columns, measured against no speculation in the same worker
    model = str(tiny_dir / "tiny-q8_0.gguf")
    fast = ["-p", "16", "-n", "12", "-r", "1", "--threads", "1", "--no-quality", "--format", "json"]
    code, out, _ = run_cli(capsys, "bench", model, *fast, "--draft-model", model, "--draft-p-min", "0", "--draft-max", "4")
    assert code == 0, out
    data = json.loads(out)
    (row,) = data["rows"]
    assert row["spec"] == "tiny-q8_0.gguf" and row["spec_acceptance"] > 0.9
    sd = {s["test"]: s["n_tokens"] for s in data["samples"] if s["test"].startswith("sd")}
    assert sd == {"sd": 12, "sd-base": 12}  # the same number of tokens each way
    assert row["sd_speedup"] > 0 and row["sd_tps"] > 0
    code, out, _ = run_cli(capsys, "bench", model, *fast[:-1], "md", "--spec", "ngram", "--draft-min", "2")
    assert code == 0, out
    assert "| ngram " in out and "sd speedup" in out and "accept" in out
    code, out, err = run_cli(capsys, "bench", model, *fast, "--draft-max", "4")  # no drafter: nothing it could tune
    assert code == 2 and "give --spec ngram or --draft-model" in err
    code, out, err = run_cli(capsys, "bench", model, *fast, "--spec", "ngram", "--draft-model", model)
    assert code == 1 and "Choose one way of drafting" in out  # refused, as a row with its reason


def test_a_worker_killed_by_a_signal_without_a_name_is_a_bench_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real-time signal has no name in Python's Signals: the worker's death is still one BenchError
    (signal.Signals(40) raised ValueError, a traceback), as in the trial load and the AMX check."""
    import signal

    from ggufrun.bench import run
    from ggufrun.errors import BenchError
    from ggufrun.exits import signal_name

    number = signal.SIGRTMIN + 6
    (tmp_path / "dying_worker.py").write_text(f"import os\nos.kill(os.getpid(), {int(number)})\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(run, "WORKER", "dying_worker")
    with pytest.raises(BenchError, match=f"worker killed by signal {int(number)}$"):
        run._spawn({})
    assert [signal_name(-11), signal_name(-9), signal_name(-int(number))] == ["SIGSEGV", "SIGKILL", f"signal {int(number)}"]
