"""A served model's lifecycle, end to end: Ollama's keep_alive and num_ctx sent by the real `ollama`
package in every call, idle unload, load and unload (Ollama's way and llama-server's router
routes), /api/ps true to the memory estimate, `ggufrun ps` / `ggufrun stop` as real processes,
residency by memory, and /api/pull, /api/delete, /api/copy against the emulated hubs.

The tiny synthetic model serves (a few hundred KB, loads in a blink); its text is noise, which is
fine: what is checked is the lifecycle around it."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from serverutil import ServerProcess, free_port, serve

from ggufrun.server.lifecycle import KeepAliveError, format_keep_alive, parse_keep_alive

ollama = pytest.importorskip("ollama")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, seed_amx_verdict: Callable[[Path], None]) -> Path:
    path = tmp_path_factory.mktemp("lifecycle-home")
    seed_amx_verdict(path)
    return path


def env_for(home: Path, **more: str) -> dict[str, str]:
    return {"GGUFRUN_HOME": str(home), "GGUFRUN_HF_ENDPOINT": "http://127.0.0.1:9", "GGUFRUN_MS_ENDPOINT": "http://127.0.0.1:9",
            "HF_HUB_DISABLE_TELEMETRY": "1", **more}


@pytest.fixture(scope="module")
def tiny(tiny_model: Path, home: Path) -> Iterator[ServerProcess]:
    with serve(str(tiny_model), "--served-model-name", "tiny", "--n-ctx", "2048", "--parallel", "2", "--threads", "1",
               "--keep-alive", "5m", "--max-num-ctx", "3072", env=env_for(home)) as server:
        yield server


def client(server: ServerProcess) -> Any:
    return ollama.Client(host=server.url, timeout=60)


def loaded(server: ServerProcess) -> dict[str, Any]:
    return {m["name"]: m for m in requests.get(f"{server.url}/api/ps", timeout=10).json()["models"]}


def wait_until(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def seconds_left(entry: dict[str, Any]) -> float:
    when = datetime.datetime.fromisoformat(entry["expires_at"].replace("Z", "+00:00"))
    return (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()


HI = [{"role": "user", "content": "hi"}]


# ---- keep_alive values ---------------------------------------------------------------------------

@pytest.mark.parametrize("value, seconds", [
    ("5m", 300.0), ("1h30m", 5400.0), ("30s", 30.0), ("1.5h", 5400.0), ("250ms", 0.25), ("0", 0.0), (0, 0.0),
    (90, 90.0), (2.5, 2.5), ("300", 300.0), (-1, None), ("-1", None), ("-1s", None), ("-5m", None), (1e12, None),
    (10**400, None), (-10**400, None), ("1" + "0" * 400, None)])  # past any float: forever, not a 500
def test_keep_alive_is_read_as_ollama_reads_it(value: Any, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["5 minutes", "soon", "", "m5", "1x", "5m3", "--5m", True, [], {}, float("nan")])
def test_a_malformed_keep_alive_is_refused_by_name(value: Any) -> None:
    with pytest.raises(KeepAliveError, match="keep_alive"):
        parse_keep_alive(value)


def test_keep_alive_reads_back() -> None:
    assert [format_keep_alive(s) for s in (300.0, 3600.0, 30.0, 0.0, None)] == ["5m", "1h", "30s", "0s", "forever"]


# ---- the ollama package: keep_alive and num_ctx in every call -----------------------------------

def test_every_ollama_call_honours_keep_alive_and_num_ctx(tiny: ServerProcess, tiny_model: Path) -> None:
    c = client(tiny)
    reply = c.chat(model="tiny", messages=HI, keep_alive="10m", options={"num_ctx": 128, "num_predict": 4})
    assert reply.done and reply.eval_count <= 4
    ps = loaded(tiny)["tiny"]
    assert 590 < seconds_left(ps) <= 601
    assert ps["size_vram"] == 0 and ps["context_length"] == 2048  # a CPU-only build: nothing on a GPU
    assert ps["size"] > tiny_model.stat().st_size  # weights + the KV cache of every slot + compute
    parts = list(c.chat(model="tiny", messages=HI, stream=True, keep_alive=45, options={"num_ctx": 256, "num_predict": 3}))
    assert parts[-1].done and 40 < seconds_left(loaded(tiny)["tiny"]) <= 46
    out = c.generate(model="tiny", prompt="hello", keep_alive=-1, options={"num_ctx": 64, "num_predict": 2})
    assert out.done and seconds_left(loaded(tiny)["tiny"]) > 200 * 365 * 86400  # forever: Ollama's year 2318
    vectors = c.embed(model="tiny", input=["red", "blue"], keep_alive="1h", options={"num_ctx": 32})
    assert len(vectors.embeddings) == 2 and 3590 < seconds_left(loaded(tiny)["tiny"]) <= 3601
    legacy = c.embeddings(model="tiny", prompt="red", keep_alive="2m", options={"num_ctx": 32})
    assert legacy.embedding and 110 < seconds_left(loaded(tiny)["tiny"]) <= 121
    c.chat(model="tiny", messages=HI, options={"num_predict": 1})  # no keep_alive: the server's --keep-alive again
    assert 290 < seconds_left(loaded(tiny)["tiny"]) <= 301


def test_num_ctx_beyond_the_served_context_is_a_400_naming_both(tiny: ServerProcess) -> None:
    c = client(tiny)
    for call in (lambda: c.chat(model="tiny", messages=HI, keep_alive="5m", options={"num_ctx": 4096}),
                 lambda: c.generate(model="tiny", prompt="hi", keep_alive="5m", options={"num_ctx": 4096}),
                 lambda: c.generate(model="tiny", keep_alive="5m", options={"num_ctx": 4096}),
                 lambda: c.embed(model="tiny", input="hi", keep_alive="5m", options={"num_ctx": 4096})):
        with pytest.raises(ollama.ResponseError) as info:
            call()
        assert info.value.status_code == 400
        assert "num_ctx" in info.value.error and "4096" in info.value.error and "2048" in info.value.error
    with pytest.raises(ollama.ResponseError) as small:  # within the served context, but the prompt is longer
        c.chat(model="tiny", messages=[{"role": "user", "content": "word " * 40}], keep_alive="5m", options={"num_ctx": 16})
    assert small.value.status_code == 400 and "num_ctx" in small.value.error
    with pytest.raises(ollama.ResponseError) as bad:
        c.chat(model="tiny", messages=HI, keep_alive="5 minutes", options={"num_ctx": 128})
    assert bad.value.status_code == 400 and "keep_alive" in bad.value.error
    with pytest.raises(ollama.ResponseError, match="num_ctx"):
        c.chat(model="tiny", messages=HI, keep_alive="5m", options={"num_ctx": "big"})


def test_images_are_refused_as_this_models_limit(tiny: ServerProcess) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client(tiny).generate(model="tiny", prompt="what is this", images=[b"\x89PNG"], keep_alive="5m",
                              options={"num_ctx": 128})
    assert "images" in info.value.error and "/v1/completions" not in info.value.error


# ---- unloading --------------------------------------------------------------------------------

def test_keep_alive_zero_unloads_after_the_reply_and_an_empty_prompt_loads(tiny: ServerProcess) -> None:
    c = client(tiny)
    reply = c.chat(model="tiny", messages=HI, keep_alive=0, options={"num_ctx": 128, "num_predict": 2})
    assert reply.done
    assert wait_until(lambda: "tiny" not in loaded(tiny), 30.0)
    load = c.generate(model="tiny", keep_alive="3m", options={"num_ctx": 128})  # `ollama run`'s load
    assert load.done_reason == "load" and 170 < seconds_left(loaded(tiny)["tiny"]) <= 181
    assert load.load_duration > 0  # it waited for a load; a request to the loaded model waits for none
    assert c.chat(model="tiny", messages=HI, keep_alive="3m", options={"num_ctx": 128, "num_predict": 1}).load_duration == 0
    unload = c.generate(model="tiny", keep_alive=0, options={"num_ctx": 128})  # `ollama stop`
    assert unload.done_reason == "unload" and "tiny" not in loaded(tiny)
    assert c.chat(model="tiny", messages=[], keep_alive=0).done_reason == "unload"  # unloading an unloaded model


def test_an_idle_model_unloads_after_its_keep_alive(tiny: ServerProcess) -> None:
    """Every look at /api/ps is checked against the earliest moment the model may go (the server's
    monotonic clock is this process's): a slow machine makes fewer looks, never a false failure."""
    c = client(tiny)
    earliest = time.monotonic() + 1.0  # its idle second starts no sooner than the request is sent
    c.chat(model="tiny", messages=HI, keep_alive="1s", options={"num_ctx": 128, "num_predict": 2})

    def gone() -> bool:
        models = loaded(tiny)
        answered = time.monotonic()  # the server answered before this, and unloaded before it answered
        if "tiny" in models:
            assert seconds_left(models["tiny"]) <= 1.0
            return False
        assert answered >= earliest, "unloaded before its second of idleness"
        return True

    assert wait_until(gone, 30.0)
    assert "unloading model tiny (idle for keep_alive 1s)" in tiny.log()


def test_an_unload_never_frees_a_model_a_request_uses(tiny: ServerProcess) -> None:
    """keep_alive 0 and the router's unload, sent while a reply streams: the reply runs to its last
    token, then the model goes. The tiny model writes ~1,500 tokens a second, so a loaded machine
    can finish the reply before both calls land: the router's "pending" says they landed in time,
    and the round is tried again (at most thrice) when they did not."""
    c = client(tiny)
    for _ in range(3):
        c.generate(model="tiny", keep_alive="5m")
        body = {"model": "tiny", "messages": HI, "max_tokens": 1500, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with requests.post(f"{tiny.url}/v1/chat/completions", json=body, stream=True, timeout=60) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line)
            assert first.startswith(b"data: ")
            assert c.generate(model="tiny", keep_alive=0).done_reason == "unload"
            busy = requests.post(f"{tiny.url}/models/unload", json={"model": "tiny"}, timeout=10)
            rest = [line for line in lines if line]
        assert rest[-1] == b"data: [DONE]"  # whole, whenever the calls came
        usage = next(json.loads(line[6:]) for line in reversed(rest) if line.startswith(b"data: {") and b'"usage"' in line)
        assert usage["usage"]["completion_tokens"] == 1500
        assert wait_until(lambda: "tiny" not in loaded(tiny), 30.0)
        if busy.status_code == 200 and "pending" in busy.json():
            break
        # the reply ended first: the router found the model idle, or already unloaded by keep_alive 0
        assert busy.json() == {"success": True} or (busy.status_code == 400 and "not loaded" in busy.text), busy.text
    else:
        pytest.fail("the reply always ended before the unload calls; the machine is too loaded to tell")
    assert busy.json()["success"]


def test_llama_server_router_load_and_unload(tiny: ServerProcess) -> None:
    url = tiny.url
    status = lambda: requests.get(f"{url}/models", timeout=10).json()["data"][0]["status"]["value"]  # noqa: E731
    assert requests.post(f"{url}/models/load", json={"model": "tiny"}, timeout=30).json() == {"success": True}
    assert "tiny" in loaded(tiny) and status() == "loaded"
    assert requests.post(f"{url}/models/unload", json={"model": "tiny"}, timeout=30).json() == {"success": True}
    assert "tiny" not in loaded(tiny) and status() == "unloaded"
    again = requests.post(f"{url}/models/unload", json={"model": "tiny"}, timeout=30)
    assert again.status_code == 400 and "not loaded" in again.json()["error"]["message"]
    unknown = requests.post(f"{url}/models/load", json={"model": "nope"}, timeout=30)
    assert unknown.status_code == 404
    assert requests.post(f"{url}/models/load", json={"name": "tiny"}, timeout=30).status_code == 400


def ggufrun(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ggufrun.cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT), **env_for(home)})


def test_ps_and_stop_are_processes_talking_to_the_server(tiny: ServerProcess, home: Path) -> None:
    client(tiny).generate(model="tiny", keep_alive="10m", options={"num_ctx": 128})
    port = str(tiny.port)
    ps = ggufrun("ps", "--port", port, home=home)
    assert ps.returncode == 0, ps.stderr
    header, row = ps.stdout.splitlines()
    assert header.split() == ["NAME", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    assert row.startswith("tiny ") and "100% CPU" in row and " 2048 " in row and "9 minutes from now" in row
    as_json = json.loads(ggufrun("ps", "--port", port, "--json", home=home).stdout)
    assert [m["name"] for m in as_json["models"]] == ["tiny"]
    stop = ggufrun("stop", "tiny", "--port", port, home=home)
    assert stop.returncode == 0, stop.stderr
    assert "tiny" not in loaded(tiny)
    again = ggufrun("stop", "tiny", "--port", port, home=home)
    assert again.returncode == 3 and "not running" in again.stderr and len(again.stderr.splitlines()) == 1
    nobody = ggufrun("ps", "--port", str(free_port()), home=home)
    assert nobody.returncode == 1 and "No ggufrun server answers" in nobody.stderr and "Traceback" not in nobody.stderr


def test_a_malformed_keep_alive_flag_is_one_line(home: Path, tiny_model: Path) -> None:
    out = ggufrun("serve", str(tiny_model), "--keep-alive", "soon", home=home)
    assert out.returncode == 2 and "--keep-alive" in out.stderr and "Traceback" not in out.stderr


def test_a_larger_num_ctx_reloads_the_model_where_serve_allows_it(tiny: ServerProcess) -> None:
    """--max-num-ctx 3072: a num_ctx of 3000 (over --n-ctx 2048) reloads the model with it; smaller
    ones then fit without another reload. (Last of the tiny server's tests: the context stays.)"""
    c = client(tiny)
    c.generate(model="tiny", keep_alive="5m", options={"num_ctx": 128})
    reply = c.chat(model="tiny", messages=HI, keep_alive="5m", options={"num_ctx": 3000, "num_predict": 2})
    assert reply.done and loaded(tiny)["tiny"]["context_length"] == 3000
    c.chat(model="tiny", messages=HI, keep_alive="5m", options={"num_ctx": 256, "num_predict": 2})
    assert loaded(tiny)["tiny"]["context_length"] == 3000 and tiny.log().count("reloading with num_ctx") == 1
    with pytest.raises(ollama.ResponseError) as beyond:  # past --max-num-ctx: the 400, no reload
        c.chat(model="tiny", messages=HI, keep_alive="5m", options={"num_ctx": 3500})
    assert beyond.value.status_code == 400 and "3000" in beyond.value.error and "--max-num-ctx" in beyond.value.error


# ---- residency by memory ---------------------------------------------------------------------

@pytest.mark.parametrize("both", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_models_are_kept_by_memory_not_only_by_count(both: bool, tiny_model_factory: Callable[..., Path], home: Path,
                                                     tmp_path: Path) -> None:
    """Two models, --max-loaded 3, and RAM (simulated) for one of them at a time by the estimate
    `show` prints: loading the second unloads the first; with room for both, both stay. The second
    offloads a layer to a (simulated) GPU: /api/ps's size_vram is that layer's share."""
    from ggufrun.gguf_info import inspect

    first, second = tiny_model_factory("qwen2", "q8_0", True), tiny_model_factory("llama", "q8_0", True)
    def expected(path: Path, ngl: int) -> Any:  # the KV cells of 1 slot + embeddings; the compute of one 128-token context
        whole = inspect(path).memory_estimate(128 * 2, n_gpu_layers=ngl)
        return dataclasses.replace(whole, compute=inspect(path).memory_estimate(128, n_gpu_layers=ngl).compute)

    estimates = [expected(first, 0), expected(second, 1)]
    need = [e.cpu for e in estimates]
    config = tmp_path / "serve.toml"
    config.write_text(f'[server]\nmax_loaded = 3\nparallel = 1\nkeep_alive = "-1"\n'
                      f'[[models]]\nmodel = "{first}"\nserved_model_name = "one"\nn_ctx = 128\nn_gpu_layers = 0\n'
                      f'[[models]]\nmodel = "{second}"\nserved_model_name = "two"\nn_ctx = 128\nn_gpu_layers = 1\n')
    ram = sum(need) + 1_000_000 if both else max(need) + min(need) // 2
    env = env_for(home, GGUFRUN_SIMULATE_RAM=str(ram), GGUFRUN_SIMULATE_GPU="name=Sim,total=8GiB,free=8GiB")
    with serve("--config", str(config), "--threads", "1", env=env) as server:
        c = client(server)
        c.generate(model="one", options={"num_ctx": 64})
        c.generate(model="two", options={"num_ctx": 64})
        ps = loaded(server)
        assert sorted(ps) == (["one", "two"] if both else ["two"]), (ram, need, ps)
        assert ps["two"]["size"] == estimates[1].total and ps["two"]["size_vram"] == estimates[1].gpu > 0
        if not both:
            assert "unloading model one (least recently used; 'two' needs" in server.log()


def test_a_model_fits_by_ram_and_by_gpu_memory_beside_the_resident_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Residency.shortfall's sums, against devices simulated the way offload's tests simulate them."""
    from ggufrun.gguf_info import MemoryEstimate
    from ggufrun.server.lifecycle import Residency

    gib = 1 << 30
    monkeypatch.setenv("GGUFRUN_SIMULATE_RAM", "10GiB")
    monkeypatch.setenv("GGUFRUN_SIMULATE_GPU", "name=Sim,total=9GiB,free=9GiB")  # 8 GiB after offload's 1 GiB margin

    def need(cpu: int, gpu: int) -> MemoryEstimate:
        return MemoryEstimate(n_ctx=1, n_gpu_layers=1 if gpu else 0, weights_gpu=gpu * gib, weights_cpu=cpu * gib,
                              kv_gpu=0, kv_cpu=0, compute=0)

    residency = Residency(300.0)
    residency.snapshot_capacity()
    residency.set_memory("a", need(6, 5))
    assert residency.shortfall(need(4, 3), ["a"]) is None
    assert "of RAM" in (residency.shortfall(need(5, 0), ["a"]) or "")
    assert "of GPU memory" in (residency.shortfall(need(1, 4), ["a"]) or "")
    assert residency.shortfall(need(5, 4), []) is None  # alone it fits
    monkeypatch.setenv("GGUFRUN_SIMULATE_RAM", "3GiB")  # what the devices report now counts too
    assert "of RAM" in (residency.shortfall(need(4, 0), []) or "")


# ---- the store: pull, delete, copy -------------------------------------------------------------

MS_REPO, HF_REPO, FILE = "org/TinyModel-GGUF", "Org/TinyModel-GGUF", "tm-q4_0.gguf"


def _gguf(path: Path) -> bytes:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tm")
    writer.add_tensor("weights", np.random.default_rng(3).random(750_000, dtype=np.float32))  # 3 MB: several progress lines
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture
def hub_server(tiny_model: Path, tmp_path: Path,
               seed_amx_verdict: Callable[[Path], None]) -> Iterator[tuple[ServerProcess, Path, bytes]]:
    import hashlib

    from hubemu import HubEmu

    home = tmp_path / "store-home"
    home.mkdir()
    seed_amx_verdict(home)
    data = _gguf(tmp_path / FILE)
    sha = hashlib.sha256(data).hexdigest()
    (home / "models.toml").write_text(
        f'[tm]\nquants = ["q4_0"]\nfile = "tm-{{quant}}.gguf"\nfiles = {{ q4_0 = {{ sha256 = "{sha}", size = {len(data)} }} }}\n'
        f'sources = [{{ hub = "modelscope", repo = "{MS_REPO}" }}, {{ hub = "huggingface", repo = "{HF_REPO}" }}]\n'
        f'[tm-hf]\nquants = ["q4_0"]\nfile = "tm-{{quant}}.gguf"\nsources = [{{ hub = "huggingface", repo = "{HF_REPO}" }}]\n')
    with HubEmu() as emu:
        emu.add("ms", MS_REPO, FILE, data)
        emu.add("hf", HF_REPO, FILE, data)
        env = env_for(home, GGUFRUN_HF_ENDPOINT=emu.url, GGUFRUN_MS_ENDPOINT=emu.url, MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS="1")
        with serve(str(tiny_model), "--served-model-name", "tiny", "--n-ctx", "128", "--threads", "1", env=env) as server:
            yield server, home, data


def test_pull_delete_and_copy_through_the_ollama_package(hub_server: tuple[ServerProcess, Path, bytes]) -> None:
    server, home, data = hub_server
    c = client(server)
    lines = list(c.pull("tm:q4_0", stream=True))
    statuses = [line.status for line in lines]
    assert statuses[0] == "pulling manifest" and statuses[-2:] == ["writing manifest", "success"]
    pulling = [line for line in lines if line.status and line.status.startswith("pulling tm-q4_0")]
    assert len(pulling) >= 2 and pulling[-1].completed == pulling[-1].total == len(data)
    assert all(line.digest and line.digest.startswith("sha256:") for line in pulling)
    assert [line.completed for line in pulling] == sorted(line.completed for line in pulling)
    cached = home / "models" / "tm" / FILE
    assert cached.read_bytes() == data
    assert c.pull("tm-hf").status == "success"  # whole, from the other hub
    assert (home / "models" / "tm-hf" / FILE).read_bytes() == data
    again = list(c.pull("tm", stream=True))  # already cached: done at once, still in Ollama's shape
    assert again[-1].status == "success" and any(line.completed == len(data) for line in again)
    with pytest.raises(ollama.ResponseError) as unknown:
        c.pull("nothing-like-this")
    assert unknown.value.status_code == 404

    assert c.copy("tm", "tm-mine").status == "success"
    copy = home / "models" / "tm-mine" / FILE
    assert copy.read_bytes() == data and os.path.samefile(copy, cached)  # a link: no second copy of the bytes
    assert "[\"tm-mine\"]" in (home / "models.toml").read_text()
    with pytest.raises(ollama.ResponseError) as taken:
        c.copy("tm", "tm-mine")
    assert taken.value.status_code >= 400 and "already" in taken.value.error
    with pytest.raises(ollama.ResponseError):
        c.copy("tm", "../../outside")
    assert c.delete("tm-mine").status == "success"
    assert not copy.exists() and cached.read_bytes() == data  # the other name is whole
    assert "tm-mine" not in (home / "models.toml").read_text() and "[tm-hf]" in (home / "models.toml").read_text()
    with pytest.raises(ollama.ResponseError) as forgotten:
        c.delete("tm-mine")
    assert forgotten.value.status_code == 404
    assert c.delete("tm").status == "success" and not cached.exists()
    with pytest.raises(ollama.ResponseError) as gone:
        c.delete("tm")
    assert gone.value.status_code == 404
    missing = requests.post(f"{server.url}/api/pull", json={"model": "hf:Org/Missing/x.gguf"}, timeout=60)
    lines = [json.loads(line) for line in missing.text.splitlines()]  # the hub's refusal, as Ollama's error line
    assert lines[0] == {"status": "pulling manifest"} and "error" in lines[-1] and len(lines) == 2
    for body in ({"model": "/etc/hostname"}, {"model": str(home / "models" / "tm-hf" / FILE)}):
        refused = requests.delete(f"{server.url}/api/delete", json=body, timeout=10)
        assert refused.status_code == 400 and "path" in refused.json()["error"]
    assert (home / "models" / "tm-hf" / FILE).exists()
    c.generate(model="tiny")
    with pytest.raises(ollama.ResponseError) as outside:  # served from a file path: not the cache's to delete
        c.delete("tiny")
    assert outside.value.status_code == 400 and "outside the cache" in outside.value.error
    assert "tiny" in loaded(server)  # and not unloaded on the way
    with pytest.raises(ollama.ResponseError) as not_cached:
        c.copy("tiny", "tiny-2")
    assert not_cached.value.status_code == 404 and "/" not in not_cached.value.error



def test_a_copy_is_forgotten_alone_and_a_hand_written_entry_never(ggufrun_home: Path) -> None:
    """copy_model appends one entry and links the file; forget_copy takes out exactly that entry, keeping
    the user's own text around it, and refuses entries it did not write."""
    from ggufrun import registry
    from ggufrun.aliases import copy_model, forget_copy

    mine = '# my models\n[tm]\nquants = ["q4_0"]\nfile = "tm-{quant}.gguf"\nsources = [{ hub = "huggingface", repo = "o/r" }]\n'
    (ggufrun_home / "models.toml").write_text(mine)
    cached = ggufrun_home / "models" / "tm" / "tm-q4_0.gguf"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF" + bytes(100))
    reg = registry.load()
    entry = copy_model(reg, "tm", "tm-two")
    assert entry.description == "copy of tm:q4_0"
    assert registry.load().resolve("tm-two").cache_path().read_bytes() == cached.read_bytes()
    with (ggufrun_home / "models.toml").open("a") as f:
        f.write('[other]\nquants = ["q8_0"]\nfile = "o-{quant}.gguf"\nsources = [{ hub = "modelscope", repo = "o/o" }]\n')
    reg = registry.load()
    assert forget_copy(reg, "tm") is None and forget_copy(reg, "other") is None and forget_copy(reg, "nope") is None
    smaller = forget_copy(reg, "tm-two")
    assert smaller is not None and smaller.get("tm-two") is None
    text = (ggufrun_home / "models.toml").read_text()
    assert text.startswith(mine) and "tm-two" not in text and "[other]" in text
    assert set(registry.load().entries) >= {"tm", "other"} and "tm-two" not in registry.load().entries
