"""Vision: synthetic projectors of real layouts that libmtmd loads, the checks before it does, images
encoded and decoded beside text in the engine's batches, and every API sending real PNG/JPEG bytes."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from serverutil import ServerProcess, serve

from ggufrun.errors import InvalidGGUFError
from ggufrun.images import ImageError, load_picture, run_end
from ggufrun.projector_info import inspect_projector, validate_projector
from ggufrun.synthetic import write_synthetic
from ggufrun.synthetic_vision import VISION_TOKENS, write_projector

ROOT = Path(__file__).resolve().parents[1]


def png(w: int = 40, h: int = 30, color: tuple[int, int, int] = (200, 10, 10), fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny llama text model with SmolVLM's image tokens, and a SmolVLM-layout (idefics3) projector."""
    root = tmp_path_factory.mktemp("vlm")
    model = write_synthetic(root / "vlm.gguf", "tiny-llama", extra_tokens=VISION_TOKENS["smolvlm"])
    return model, write_projector(root / "mmproj.gguf", "smolvlm-tiny", 64)


_CHILD = r"""
import json, sys
from ggufrun.runtime import Model
from ggufrun.settings import Settings
from ggufrun.images import load_picture
from ggufrun.llama.vision import Projector
model = Model.load(sys.argv[1], Settings(n_ctx=512, threads=1, batch_size=128, ubatch_size=128))
proj = Projector(model, __import__("pathlib").Path(sys.argv[2]), n_threads=1, use_gpu=False)
pic = load_picture(open(sys.argv[3], "rb").read())
tokens, embeds = proj.block(pic)
for e in embeds:
    model.images[e.key] = e
out = model.decode([(0, [1] + tokens + [10, 11], True)])
again, _ = proj.block(pic)
print(json.dumps({"n": len(tokens), "images": [list(e.rows.shape) for e in embeds], "seq": model.seq_len(0),
                  "out": out, "same": again == tokens, "non_causal": proj.non_causal,
                  "text": model.detokenize([t for t in tokens if t >= 0], special=True)}))
"""


@pytest.mark.parametrize("kind,arch", [("smolvlm-tiny", "llama"), ("gemma3-tiny", "gemma3")])
def test_synthetic_projector_loads_tokenizes_and_encodes_in_libmtmd(tmp_path: Path, kind: str, arch: str) -> None:
    # in a child process: a layout libmtmd does not expect aborts it
    model = write_synthetic(tmp_path / "m.gguf", "tiny", arch=arch, extra_tokens=VISION_TOKENS[kind.split("-")[0]])
    mmproj = write_projector(tmp_path / "p.gguf", kind, 64)
    image = tmp_path / "red.png"
    image.write_bytes(png())
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(mmproj), str(image)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(shape[1] == 64 for shape in got["images"])  # rows of the text model's width
    # image rows took their positions; logits of the last text token: a llama prompt is one embedding batch
    # (its text as token_embd's rows, llama/text_rows.py), gemma-3's runs a decode each (the last text run's 2)
    assert got["seq"] == 1 + got["n"] + 2 and got["out"] == ([got["seq"] - 1] if arch == "llama" else [2])
    assert got["same"]  # the same bytes give the same image tokens: prefix reuse
    if kind.startswith("smolvlm"):
        # a 40x30 picture scaled to 64x48: the overview and 2x2 tiles of 32 px, 4 tokens each, framed by idefics3's markers
        assert got["images"] == [[4, 64]] * 5 and "<global-img>" in got["text"] and "<row_2_col_2>" in got["text"]
        assert not got["non_causal"]
    else:
        assert got["images"] == [[4, 64]] and "<start_of_image>" in got["text"] and got["non_causal"]


_POOL_CHILD = r"""
import concurrent.futures, json, os, sys
from pathlib import Path
from ggufrun.runtime import Model
from ggufrun.settings import Settings
from ggufrun.images import load_picture
from ggufrun.llama.vision import Projector
model = Model.load(sys.argv[1], Settings(n_ctx=512, threads=2, batch_size=128, ubatch_size=128))
proj = Projector(model, Path(sys.argv[2]), n_threads=2, use_gpu=False)
model.decode([(0, [1, 2, 3], True)])  # the decoding thread's own workers exist from here on
pool = concurrent.futures.ThreadPoolExecutor(1)
pool.submit(lambda: None).result()  # the pool's thread, alive before and after
before = len(os.listdir("/proc/self/task"))
tokens, _ = pool.submit(proj.block, load_picture(open(sys.argv[3], "rb").read())).result()
for _ in range(100):  # a thread that has ended leaves the list a moment later (longer on a loaded machine)
    after = len(os.listdir("/proc/self/task"))
    if after <= before:
        break
    __import__("time").sleep(0.05)
print(json.dumps({"before": before, "after": after, "n": len(tokens)}))
"""


def test_a_cpu_encode_leaves_no_worker_threads_behind_in_a_pool_thread(tmp_path: Path, vlm: tuple[Path, Path]) -> None:
    # Server requests encode on long-lived pool threads: OpenMP workers that ran an encode there and
    # stayed spin-waiting halved the model's decode speed on a 2-core CPU (llama/vision._in_own_thread).
    image = tmp_path / "red.png"
    image.write_bytes(png())
    proc = subprocess.run([sys.executable, "-c", _POOL_CHILD, str(vlm[0]), str(vlm[1]), str(image)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["n"] > 0 and got["after"] <= got["before"]


def test_synth_cli_writes_a_projector_beside_the_model(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ggufrun.cli.main import cli

    out = tmp_path / "vlm.gguf"
    result = CliRunner().invoke(cli, ["synth", "--shape", "tiny-llama", "--projector", "smolvlm-tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    info = inspect_projector(tmp_path / "mmproj-smolvlm-tiny.gguf")
    assert (info.projector_type, info.text_n_embd, info.tokens_per_tile) == ("idefics3", 64, 4)
    again = CliRunner().invoke(cli, ["synth", "--shape", "tiny-llama", "--projector", "smolvlm-tiny", "--out", str(out)])
    assert again.exit_code != 0 and "already exists" in str(again.exception)


def test_full_projector_shapes_are_the_published_ones() -> None:
    from ggufrun.synthetic_vision import PROJECTORS, plan_projector

    smol = sum(t.n_bytes for t in plan_projector(PROJECTORS["smolvlm"], 576)) / 1e6
    gemma = sum(t.n_bytes for t in plan_projector(PROJECTORS["gemma3"], 2560)) / 1e6
    # SmolVLM-256M's mmproj f16 is ~190 MB; gemma-3-4b's ~850 MB (ggml-org's GGUFs)
    assert 170 < smol < 210 and 780 < gemma < 900, (smol, gemma)


def test_projector_checks_refuse_bad_files_by_name(tmp_path: Path, vlm: tuple[Path, Path]) -> None:
    model, mmproj = vlm
    with pytest.raises(InvalidGGUFError, match="feeds a text model of width 64; this model's is 896"):
        validate_projector(mmproj, 896)
    with pytest.raises(InvalidGGUFError, match="architecture is 'llama', not clip"):
        inspect_projector(model)
    import gguf

    # a projector whose patch size does not divide its image size (clip.cpp would assert)
    r = gguf.GGUFReader(mmproj)
    bad = tmp_path / "bad.gguf"
    data = bytearray(mmproj.read_bytes())
    field = r.fields["clip.vision.patch_size"]
    off = int(field.parts[-1].__array_interface__["data"][0] - r.data.__array_interface__["data"][0])
    data[off:off + 4] = (7).to_bytes(4, "little")
    bad.write_bytes(bytes(data))
    with pytest.raises(InvalidGGUFError, match="image size 32 is not a multiple of patch size 7"):
        inspect_projector(bad)
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(mmproj.read_bytes()[:5000])
    with pytest.raises(InvalidGGUFError):
        inspect_projector(trunc)


def test_pictures_are_checked_with_pillow() -> None:
    pic = load_picture(png(5000, 10, fmt="JPEG"))
    assert (pic.width, pic.height) == (2048, 4) and len(pic.rgb) == 2048 * 4 * 3  # scaled to the longest side
    with pytest.raises(ImageError, match="not an image"):
        load_picture(b"GIF89a-not-really")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_picture(png()[:60])
    with pytest.raises(ImageError, match="limit is"):
        load_picture(png(), max_bytes=10)
    assert load_picture(png()).digest == load_picture(png()).digest != load_picture(png(color=(0, 0, 1))).digest


def test_a_huge_picture_is_refused_from_its_header_without_a_warning() -> None:
    import struct
    import warnings
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    # a PNG header claiming 10000x10000 pixels (over Pillow's own 89 M warning, under its 179 M error)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 10000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    with warnings.catch_warnings(record=True) as seen:
        with pytest.raises(ImageError, match="10000x10000 pixels; the limit is 50,000,000"):
            load_picture(bomb)
    assert not [w for w in seen if "decompression bomb" in str(w.message)]


def test_prompt_chunks_stop_where_text_and_images_meet() -> None:
    assert run_end([5, 6, -3, -4, 7], 10) == 2
    assert run_end([-3, -4, 7], 10) == 2
    assert run_end([-3, -4, -5], 2) == 2
    assert run_end([], 4) == 0


# ---- serving: every API with real clients and real image bytes ----------------------------------

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
ollama = pytest.importorskip("ollama")
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def server_env(tmp_path_factory: pytest.TempPathFactory, seed_amx_verdict: Callable[[Path], None]) -> dict[str, str]:
    home = tmp_path_factory.mktemp("vision-home")
    seed_amx_verdict(home)
    return {"GGUFRUN_HOME": str(home), "GGUFRUN_HF_ENDPOINT": "http://127.0.0.1:9", "GGUFRUN_MS_ENDPOINT": "http://127.0.0.1:9"}


@pytest.fixture(scope="module")
def vsrv(vlm: tuple[Path, Path], server_env: dict[str, str]) -> Iterator[ServerProcess]:
    model, mmproj = vlm
    # two copies asked for: on the CPU one is loaded, and the server says so (CPU_ENCODERS_NOTE)
    with serve(str(model), "--mmproj", str(mmproj), "--served-model-name", "vlm", "--parallel", "4", "--n-ctx", "512",
               "--threads", "1", "--image-encoders", "2", env=server_env) as server:
        yield server


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def oai(server: ServerProcess) -> Any:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client: Any, *parts: dict[str, Any], **kw: Any) -> Any:
    kw.setdefault("max_tokens", 4)
    return client.chat.completions.create(model="vlm", messages=[{"role": "user", "content": list(parts)}], **GREEDY, **kw)


def img(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


TEXT = {"type": "text", "text": "What is in the picture?"}


def test_openai_image_url_counts_its_tokens_and_a_repeated_image_reuses_its_kv(vsrv: ServerProcess) -> None:
    assert "vlm: --image-encoders 2: on the CPU pictures are encoded one at a time" in vsrv.log()  # said, not dropped
    client = oai(vsrv)
    plain = ask(client, TEXT)
    seen = ask(client, TEXT, img(data_url(png(color=(1, 2, 3)))))
    # a 40x30 picture: overview + 2x2 tiles of 4 tokens each, framed by idefics3's marker tokens
    assert seen.usage.prompt_tokens >= plain.usage.prompt_tokens + 20
    again = ask(client, TEXT, img(data_url(png(color=(1, 2, 3)))))
    assert again.usage.prompt_tokens == seen.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens == seen.usage.prompt_tokens - 1  # the image's KV reused
    other = ask(client, TEXT, img(data_url(png(color=(9, 9, 9)))))
    # another image: the text and framing before it are reused, its own 8 tokens and what follows are not
    assert other.usage.prompt_tokens_details.cached_tokens <= seen.usage.prompt_tokens - 8 - 1
    jpeg = ask(client, img(data_url(png(20, 60, fmt="JPEG"), "jpeg")), TEXT)  # tall: 1x2 tiles + overview
    assert plain.usage.prompt_tokens + 12 <= jpeg.usage.prompt_tokens < seen.usage.prompt_tokens
    assert jpeg.choices[0].finish_reason == "length"


@pytest.mark.parametrize("url,match", [
    ("http://127.0.0.1:9/cat.png", "does not fetch image URLs"),
    ("data:image/png;base64,AAAA", "not an image ggufrun can read"),
    (data_url(png()[:70]), "corrupt or truncated"),
    ("data:image/png;base64,@@@", "not valid base64"),
    ("file:///etc/passwd", "expected a data: URL or an http"),
])
def test_openai_bad_images_are_400s_naming_the_part(vsrv: ServerProcess, url: str, match: str) -> None:
    with pytest.raises(openai.BadRequestError, match=match) as err:
        ask(oai(vsrv), TEXT, img(url))
    assert err.value.body["param"] == "messages[0].content[1].image_url.url"


def test_images_beside_text_requests_all_answer(vsrv: ServerProcess) -> None:
    client = oai(vsrv)
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        parts = [TEXT, img(data_url(png(20 + i, 30, color=(i, 40, 80))))] if i % 2 else [TEXT]
        results[i] = ask(client, *parts, max_tokens=6)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(8))
    assert all(r.usage.completion_tokens == 6 for r in results.values())


@pytest.mark.slow  # ~14 s: fifteen pictures of five 256-px tiles
def test_a_text_request_does_not_wait_behind_other_requests_pictures(tmp_path: Path, server_env: dict[str, str]) -> None:
    """Requests with images wait for the projector (one encode at a time) in threads of their own:
    in the executor every prompt is built in, they held all its threads (6 on 2 cores), and a text
    request sent after 14 of them waited for 9 encodes."""
    from PIL import Image

    model = write_synthetic(tmp_path / "m.gguf", "tiny-llama", extra_tokens=VISION_TOKENS["smolvlm"])
    mmproj = write_projector(tmp_path / "p.gguf", "smolvlm-small", 64)  # 5 tiles of 256 px a picture: a slow encode

    def noise(i: int) -> str:
        buf = io.BytesIO()
        Image.frombytes("RGB", (512, 512), bytes(random.Random(i).randbytes(512 * 512 * 3))).save(buf, "PNG")
        return data_url(buf.getvalue())

    # more than asyncio's default pool holds on this machine (min(32, cores + 4)): the old path filled it
    n = min(32, (os.cpu_count() or 1) + 4) + 8
    pictures = [noise(i) for i in range(n)]
    with serve(str(model), "--mmproj", str(mmproj), "--served-model-name", "vlm", "--parallel", "4", "--n-ctx", "512",
               "--threads", "1", env=server_env) as server:
        client = oai(server)
        ask(client, TEXT, img(noise(99)))  # warm-up
        done: list[str] = []

        def one(name: str, *parts: dict[str, Any]) -> None:
            ask(client, *parts)
            done.append(name)

        threads = [threading.Thread(target=one, args=(f"image {i}", TEXT, img(p))) for i, p in enumerate(pictures)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        text = threading.Thread(target=one, args=("text", TEXT))
        text.start()
        for t in [*threads, text]:
            t.join(timeout=120)
    assert len(done) == n + 1 and done.index("text") <= 4, done  # before (2 cores, 14 pictures): after 9 of them


def test_responses_input_image(vsrv: ServerProcess) -> None:
    import httpx

    # llama-server's web UI offers image upload from /props: a model with a projector says it sees
    assert httpx.get(f"{vsrv.url}/props", timeout=30).json()["modalities"]["vision"] is True
    client = oai(vsrv)
    r = client.responses.create(model="vlm", max_output_tokens=4, temperature=0, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "Describe"}, {"type": "input_image", "image_url": data_url(png(color=(5, 6, 7)))}]}])
    plain = client.responses.create(model="vlm", max_output_tokens=4, temperature=0, input="Describe")
    assert r.status in ("completed", "incomplete") and r.usage.input_tokens >= plain.usage.input_tokens + 8
    with pytest.raises(openai.BadRequestError, match="corrupt or truncated") as bad:  # named by the Responses field
        client.responses.create(model="vlm", max_output_tokens=4, input=[{"role": "user", "content": [
            {"type": "input_text", "text": "Describe"}, {"type": "input_image", "image_url": data_url(png()[:70])}]}])
    assert bad.value.body["param"] == "input[0].content[1].image_url"
    with pytest.raises(openai.BadRequestError, match="file_id"):
        client.responses.create(model="vlm", max_output_tokens=4, input=[{"role": "user", "content": [
            {"type": "input_image", "file_id": "file-1"}]}])


def test_anthropic_image_blocks(vsrv: ServerProcess) -> None:
    client = anthropic.Anthropic(base_url=vsrv.url, api_key="unused", max_retries=0, timeout=60)
    jpeg = base64.b64encode(png(fmt="JPEG")).decode()
    msg = client.messages.create(model="vlm", max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": jpeg}},
        {"type": "text", "text": "What is this?"}]}])
    plain = client.messages.create(model="vlm", max_tokens=4, messages=[{"role": "user", "content": "What is this?"}])
    assert msg.usage.input_tokens >= plain.usage.input_tokens + 8
    with pytest.raises(anthropic.BadRequestError, match="media_type") as err:
        client.messages.create(model="vlm", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/tiff", "data": jpeg}}]}])
    assert err.value.body["type"] == "error"  # Anthropic's own error shape
    counted = client.messages.count_tokens(model="vlm", messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": jpeg}},
        {"type": "text", "text": "What is this?"}]}])
    assert counted.input_tokens == msg.usage.input_tokens  # the image's tokens counted as the reply's prompt has them
    with pytest.raises(anthropic.BadRequestError, match="corrupt or truncated"):
        client.messages.create(model="vlm", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(png()[:70]).decode()}}, {"type": "text", "text": "x"}]}])


def test_ollama_images(vsrv: ServerProcess) -> None:
    client = ollama.Client(host=vsrv.url, timeout=60)
    r = client.chat(model="vlm", messages=[{"role": "user", "content": "What is this?", "images": [png(color=(3, 3, 3))]}],
                    options={"num_predict": 4, "temperature": 0})
    plain = client.chat(model="vlm", messages=[{"role": "user", "content": "What is this?"}],
                        options={"num_predict": 4, "temperature": 0})
    assert r.prompt_eval_count >= plain.prompt_eval_count + 8
    gen = client.generate(model="vlm", prompt="What is this?", images=[png(color=(4, 4, 4))], options={"num_predict": 2})
    assert gen.prompt_eval_count >= plain.prompt_eval_count + 8
    import urllib.request  # base64 wrapped at 76 columns, as `base64 FILE` writes it (no client library re-encodes it)
    wrapped = base64.encodebytes(png(color=(5, 5, 5))).decode()
    assert "\n" in wrapped.rstrip("\n")
    body = {"model": "vlm", "stream": False, "options": {"num_predict": 2}, "messages": [
        {"role": "user", "content": "What is this?", "images": [wrapped]}]}
    request = urllib.request.Request(f"{vsrv.url}/api/chat", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert json.loads(reply.read())["prompt_eval_count"] >= plain.prompt_eval_count + 8
    with pytest.raises(ollama.ResponseError, match="not an image"):
        client.chat(model="vlm", messages=[{"role": "user", "content": "x", "images": [b"not an image at all"]}],
                    options={"num_predict": 2})


def test_a_text_model_refuses_images_by_name(tiny_model: Path, server_env: dict[str, str]) -> None:
    with serve(str(tiny_model), "--served-model-name", "tiny", "--n-ctx", "256", "--threads", "1", "--image-encoders", "2",
               env=server_env) as srv:
        import httpx

        assert httpx.get(f"{srv.url}/props", timeout=30).json()["modalities"]["vision"] is False
        with pytest.raises(openai.BadRequestError, match="Model 'tiny' does not see images"):
            oai(srv).chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
                TEXT, img(data_url(png()))]}])
        with pytest.raises(ollama.ResponseError, match="does not see images"):
            ollama.Client(host=srv.url, timeout=60).chat(model="tiny", messages=[
                {"role": "user", "content": "x", "images": [png()]}])
        assert "tiny has no vision projector: --image-encoders 2 does nothing" in srv.log()  # said, not dropped


@pytest.mark.slow
def test_image_urls_are_fetched_only_with_the_flag(vlm: tuple[Path, Path], server_env: dict[str, str], tmp_path: Path) -> None:
    import functools
    import http.server

    (tmp_path / "cat.png").write_bytes(png(color=(7, 7, 7)))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        model, mmproj = vlm
        with serve(str(model), "--mmproj", str(mmproj), "--served-model-name", "vlm", "--n-ctx", "512", "--threads", "1",
                   "--allow-image-urls", env=server_env) as srv:
            url = f"http://127.0.0.1:{httpd.server_address[1]}/cat.png"
            r = ask(oai(srv), TEXT, img(url))
            assert r.usage.prompt_tokens > 8
            with pytest.raises(openai.BadRequestError, match="could not fetch"):
                ask(oai(srv), TEXT, img(url + ".missing"))
    finally:
        httpd.shutdown()


# ---- models: the projector found and fetched with its model --------------------------------------


@pytest.mark.parametrize("kind", ["hf", pytest.param("ms", marks=pytest.mark.slow)])
def test_a_repo_reference_fetches_the_repos_projector_and_loads_it(kind: str, vlm: tuple[Path, Path], ggufrun_home: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from hubemu import HubEmu

    from ggufrun import registry
    from ggufrun.loader import open_model

    model, mmproj = vlm
    with HubEmu() as emu:
        emu.add(kind, "Org/VLM-GGUF", "vlm-Q4_K_M.gguf", model.read_bytes())
        emu.add(kind, "Org/VLM-GGUF", "mmproj-vlm-f16.gguf", mmproj.read_bytes())
        emu.add(kind, "Org/VLM-GGUF", "mmproj-vlm-Q8_0.gguf", b"GGUF not this one")
        emu.add(kind, "Org/Text-GGUF", "text-Q4_K_M.gguf", model.read_bytes())
        monkeypatch.setenv("GGUFRUN_HF_ENDPOINT", emu.url)
        monkeypatch.setenv("GGUFRUN_MS_ENDPOINT", emu.url)
        monkeypatch.setenv("MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS", "1")
        settings = {"n_ctx": 256, "threads": 1}
        from ggufrun.vision import summary

        remote = summary(registry.load().resolve(f"{kind}:Org/VLM-GGUF"))  # show, before a pull: the header by range requests
        assert remote is not None and remote["projector_type"] == "idefics3" and remote["projector"] == "mmproj-vlm-f16.gguf"
        loaded = open_model(f"{kind}:Org/VLM-GGUF", registry.load(), settings)
        try:
            assert loaded.vision is not None and loaded.vision.path.name == "mmproj-vlm-f16.gguf"
            assert loaded.vision.path.read_bytes() == mmproj.read_bytes()
        finally:
            loaded.close()
        text = open_model(f"{kind}:Org/Text-GGUF", registry.load(), settings)
        text.close()
        assert text.vision is None
        emu.requests.clear()
        for name in ("VLM", "Text"):  # cached: no request (a text-only repo was listed once and marked)
            open_model(f"{kind}:Org/{name}-GGUF", registry.load(), settings).close()
        assert emu.requests == []


def test_mmproj_flag_overrides_and_a_wrong_projector_is_refused_by_name(vlm: tuple[Path, Path], tmp_path: Path) -> None:
    from ggufrun import registry
    from ggufrun.loader import open_model

    model, mmproj = vlm
    wide = write_projector(tmp_path / "wide.gguf", "smolvlm-tiny", 96)
    with pytest.raises(InvalidGGUFError, match="feeds a text model of width 96; this model's is 64"):
        open_model(str(model), registry.load(), {"n_ctx": 256, "threads": 1, "mmproj": str(wide)})
    from ggufrun.errors import ConfigError

    with pytest.raises(ConfigError, match="No projector file"):
        open_model(str(model), registry.load(), {"n_ctx": 256, "threads": 1, "mmproj": str(tmp_path / "none.gguf")})
    loaded = open_model(str(model), registry.load(), {"n_ctx": 256, "threads": 1, "mmproj": str(mmproj)})
    assert loaded.vision is not None
    loaded.close()


def test_a_lone_prompt_takes_whole_runs_and_no_run_is_cut_differently() -> None:
    from ggufrun.images import count_runs, runs_end

    tokens = [1, 2, -1, -2, -3, 3, -9, -10, 4, 5]  # text 2, image 3, text 1, image 2, text 2
    assert count_runs(tokens) == 5 and count_runs([]) == 0
    assert runs_end(tokens, 100) == 10  # all of it: five decodes in one step
    assert runs_end(tokens, 7) == 6  # the next image run would be cut: it waits, whole, for the next step
    assert runs_end(tokens, 1) == 1  # a first run longer than the limit is cut, as run_end cuts it
    assert runs_end(tokens[2:], 2) == 2 and runs_end([-1, -2, -3], 2, whole=True) == 0


def test_whole_images_are_never_cut_between_steps() -> None:
    assert run_end([-3, -4, -5, 7], 2, whole=True) == 0  # waits for a step with room
    assert run_end([-3, -4, -5, 7], 3, whole=True) == 3
    assert run_end([5, 6, -3], 2, whole=True) == 2


@pytest.mark.slow
def test_gemma3_images_are_decoded_whole_beside_other_requests(tmp_path: Path, server_env: dict[str, str]) -> None:
    model = write_synthetic(tmp_path / "g.gguf", "tiny-gemma3", extra_tokens=VISION_TOKENS["gemma3"])
    mmproj = write_projector(tmp_path / "gp.gguf", "gemma3-tiny", 64)
    with serve(str(model), "--mmproj", str(mmproj), "--served-model-name", "vlm", "--parallel", "3", "--n-ctx", "256",
               "--batch-size", "16", "--threads", "1", env=server_env) as srv:
        client = oai(srv)
        results: list[Any] = []
        threads = [threading.Thread(target=lambda i=i: results.append(ask(client, TEXT, img(data_url(png(color=(i, 1, 1)))),
                                                                          max_tokens=8))) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 3 and all(r.usage.completion_tokens == 8 for r in results)


def test_a_projector_ggufrun_does_not_decode_leaves_the_model_text_only(vlm: tuple[Path, Path], tmp_path: Path) -> None:
    import gguf

    from ggufrun import registry
    from ggufrun.loader import open_model

    model, _ = vlm
    other = tmp_path / "mmproj-pixtral.gguf"  # a Pixtral projector's header: a layout ggufrun does not check
    w = gguf.GGUFWriter(other, "clip")
    w.add_string("clip.projector_type", "pixtral")
    w.add_bool("clip.has_vision_encoder", True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    said: list[str] = []
    loaded = open_model(str(model), registry.load(), {"n_ctx": 256, "threads": 1, "mmproj": str(other)}, report=said.append)
    try:
        assert "pixtral projector" in said[0] and loaded.vision is not None
        with pytest.raises(ImageError, match="reads text only here: .*pixtral projector"):
            loaded.vision.block(load_picture(png()))
    finally:
        loaded.close()


# ---- chat: --image, /image, -p -------------------------------------------------------------------


def test_chat_session_sees_images_and_reuses_them_across_turns(vlm: tuple[Path, Path], tmp_path: Path) -> None:
    from ggufrun import registry
    from ggufrun.chat import ChatSession
    from ggufrun.images import NoVisionError
    from ggufrun.loader import open_model

    model, mmproj = vlm
    image = tmp_path / "g.png"
    image.write_bytes(png(50, 40, color=(10, 200, 30)))
    loaded = open_model(str(model), registry.load(), {"n_ctx": 512, "threads": 1, "mmproj": str(mmproj), "max_tokens": 4,
                                                      "temperature": 0})
    try:
        session = ChatSession(loaded.model, loaded.settings, family=loaded.family, vision=loaded.vision)
        assert "Image attached (50x40)" in session.command(f"/image {image}").text
        first = session.ask("What is this?")
        list(first)
        plain = ChatSession(loaded.model, loaded.settings, family=loaded.family).tokens([{"role": "user", "content": "What is this?"}])
        assert first.stats.prompt_tokens >= len(plain) + 20  # overview + 2x2 tiles of 4 tokens, and their markers
        encoded = loaded.vision.encoded
        second = session.ask("And now?")
        list(second)
        assert loaded.vision.encoded == encoded  # the picture in the history is not encoded again
        assert second.stats.cached_tokens >= first.stats.prompt_tokens - 1  # nor decoded again: its KV is reused
        saved = json.loads(session.save(tmp_path / "chat.json").read_text())
        assert saved["messages"][0]["content"].startswith("[image 50x40]")
        with pytest.raises(ImageError, match="No image file"):
            session.command(f"/image {tmp_path / 'missing.png'}")
        (tmp_path / "text.png").write_text("not an image")
        with pytest.raises(ImageError, match="not an image"):
            session.attach_image(tmp_path / "text.png")
        blind = ChatSession(loaded.model, loaded.settings, family=loaded.family, model_name="tiny")
        with pytest.raises(NoVisionError, match="tiny does not see images"):
            blind.command(f"/image {image}")
    finally:
        loaded.close()


@pytest.mark.slow
def test_chat_cli_image_with_p(vlm: tuple[Path, Path], tmp_path: Path) -> None:
    model, mmproj = vlm
    image = tmp_path / "g.jpg"
    image.write_bytes(png(fmt="JPEG"))
    base = [sys.executable, "-m", "ggufrun.cli.main", "chat", str(model), "-p", "What is it?", "--max-tokens", "3",
            "--n-ctx", "512", "--threads", "1", "-v"]
    ok = subprocess.run([*base, "--mmproj", str(mmproj), "--image", str(image)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([*base, "--image", str(image)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert refused.returncode != 0 and "does not see images" in refused.stderr and "Traceback" not in refused.stderr


def test_show_says_the_model_sees_images_and_what_the_projector_costs(vlm: tuple[Path, Path]) -> None:
    from click.testing import CliRunner

    from ggufrun.cli.main import cli

    model, mmproj = vlm
    out = CliRunner().invoke(cli, ["show", str(model), "--mmproj", str(mmproj), "--json"])
    assert out.exit_code == 0, out.output
    vision = json.loads(out.output)["vision"]
    assert vision["sees_images"] and vision["projector_type"] == "idefics3" and vision["memory_bytes"] == mmproj.stat().st_size
    table = CliRunner().invoke(cli, ["show", str(model), "--mmproj", str(mmproj)])
    assert "images" in table.output and "4 tokens per 32 px tile" in table.output


def test_one_engine_step_decodes_an_image_beside_another_sequences_tokens(vlm: tuple[Path, Path]) -> None:
    from ggufrun.llama.vision import Projector
    from ggufrun.runtime import Model
    from ggufrun.settings import Settings

    model_path, mmproj = vlm
    with Model.load(model_path, Settings(n_ctx=512, threads=1, batch_size=128, ubatch_size=128), n_seq_max=2) as model:
        proj = Projector(model, mmproj, n_threads=1, use_gpu=False)
        tokens, embeds = proj.block(load_picture(png()))
        held = [model.images.setdefault(e.key, e) for e in embeds]
        first_image = next(i for i, t in enumerate(tokens) if t < 0)
        run = run_end(tokens[first_image:], 128)
        model.decode([(0, [1, 10, 11], True)])
        model.decode([(1, [1] + tokens[:first_image], False)])
        # the step: sequence 0's next token (token batch, sampled) and sequence 1's image rows (embedding batch)
        out = model.decode([(0, [12], True), (1, tokens[first_image:first_image + run], False)])
        assert out == [0, -1] and model.seq_len(0) == 4 and model.seq_len(1) == 1 + first_image + run
        assert model.logits_rows(1).shape == (1, model.n_vocab)  # the text row's logits survive the image batch
        proj.close()
        assert held


def test_a_repeated_picture_does_not_wait_behind_another_encoding(vlm: tuple[Path, Path]) -> None:
    from ggufrun.llama.vision import Projector
    from ggufrun.runtime import Model
    from ggufrun.settings import Settings

    model_path, mmproj = vlm
    with Model.load(model_path, Settings(n_ctx=256, threads=1, batch_size=128, ubatch_size=128)) as model:
        proj = Projector(model, mmproj, n_threads=1, use_gpu=False)
        pic = load_picture(png(33, 20))
        first = proj.block(pic)
        got: list[Any] = []
        ctx = proj._idle.get()  # its only encoder busy, as while another request's picture is being encoded
        try:
            reader = threading.Thread(target=lambda: got.append(proj.block(pic)))
            reader.start()
            reader.join(timeout=10)
            assert got == [first] and proj.encoded == 1
        finally:
            proj._idle.put(ctx)
        proj.close()


def test_pictures_cut_in_parallel_encode_as_one_at_a_time(vlm: tuple[Path, Path]) -> None:
    """libmtmd's preprocessing runs in the callers' threads (as llama-server runs it in its HTTP
    threads), and three copies of the projector encode at once: pictures blocked from several
    threads at once give the very tokens and rows one context gives one after another, and a
    picture asked for twice at once is encoded once."""
    from concurrent.futures import ThreadPoolExecutor

    from ggufrun.llama.vision import Projector
    from ggufrun.runtime import Model
    from ggufrun.settings import Settings

    model_path, mmproj = vlm
    pics = [load_picture(png(40 + 7 * i, 30 + 5 * i, (30 * i, 200 - 20 * i, 90))) for i in range(8)]
    with Model.load(model_path, Settings(n_ctx=256, threads=1, batch_size=128, ubatch_size=128)) as model:
        one, many = (Projector(model, mmproj, n_threads=1, use_gpu=False, encoders=k) for k in (1, 3))
        assert many.encoders == 3
        alone = [one.block(p) for p in pics]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(many.block, pics + pics))  # each twice: one encode, the other waits or hits
        assert many.encoded == 8
        for (tokens, embeds), (tokens2, embeds2) in zip(alone + alone, together):
            assert tokens == tokens2 and all((a.rows == b.rows).all() for a, b in zip(embeds, embeds2))
        one.close()
        many.close()


def test_detail_low_is_a_512_pixel_picture_of_its_own() -> None:
    """OpenAI's image_url detail: "low" sends the projector a picture scaled to 512 pixels (fewer
    tiles where the projector tiles), cached apart from the same bytes at full size."""
    from ggufrun.server.media import openai_content

    data = png(1200, 900)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    parts = openai_content([{"type": "image_url", "image_url": {"url": url, "detail": "low"}},
                            {"type": "image_url", "image_url": {"url": url}}], "messages[0].content")
    assert parts is not None
    low, full = (load_picture(data, max_side=p["max_side"]) for p in parts)
    assert (low.width, low.height) == (512, 384) and (full.width, full.height) == (1200, 900)
    assert low.digest != full.digest


def test_image_encoders_auto_is_one_on_a_cpu_and_copies_that_fit_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from ggufrun.vision import GPU_ENCODERS, encoder_count

    mb = 1000**2
    assert encoder_count("auto", gpu=False, n_seq_max=16, projector_bytes=200 * mb) == 1
    assert encoder_count(2, gpu=False, n_seq_max=16, projector_bytes=200 * mb) == 1  # encodes take turns with decodes there
    monkeypatch.setenv("GGUFRUN_SIMULATE_GPU", "name=G,total=80GB,free=60GB")
    assert encoder_count(2, gpu=True, n_seq_max=16, projector_bytes=200 * mb) == 2  # asked for: honoured
    assert encoder_count("auto", gpu=True, n_seq_max=1, projector_bytes=200 * mb) == 1  # one sequence: one picture at a time
    assert encoder_count("auto", gpu=True, n_seq_max=16, projector_bytes=200 * mb) == GPU_ENCODERS
    monkeypatch.setenv("GGUFRUN_SIMULATE_GPU", "name=G,total=8GB,free=1GB")
    assert encoder_count("auto", gpu=True, n_seq_max=16, projector_bytes=200 * mb) == 1  # copies within a quarter of free memory


def test_closing_the_projector_waits_for_the_picture_being_encoded(vlm: tuple[Path, Path]) -> None:
    """A model unloaded (keep_alive, shutdown) while a request's picture is being encoded: the
    contexts are freed by the last encode, not under it, and a later picture is refused by name."""
    from ggufrun.errors import ModelLoadError
    from ggufrun.llama.vision import Projector
    from ggufrun.runtime import Model
    from ggufrun.settings import Settings

    model_path, mmproj = vlm
    with Model.load(model_path, Settings(n_ctx=256, threads=1, batch_size=128, ubatch_size=128)) as model:
        proj = Projector(model, mmproj, n_threads=1, use_gpu=False)
        ctx = proj._idle.get()  # the encoder busy: the reader below waits for it inside block()
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.append(proj.block(load_picture(png(21, 34)))))
        reader.start()
        deadline = time.monotonic() + 10
        while not proj._users and time.monotonic() < deadline:
            time.sleep(0.01)
        proj.close()
        assert proj._ctx is not None  # still in use
        proj._idle.put(ctx)
        reader.join(timeout=10)
        assert got and got[0][1] and proj._ctx is None  # encoded, then freed by the last user
        with pytest.raises(ModelLoadError, match="unloaded"):
            proj.block(load_picture(png(22, 35)))


def test_on_a_cpu_an_encode_and_a_decode_take_turns(vlm: tuple[Path, Path]) -> None:
    """llama.cpp's CPU threads spin at their barriers: an encode beside a decode on the same cores
    slowed both, so on the CPU the projector encodes only between the model's decodes."""
    from ggufrun.llama.vision import Projector
    from ggufrun.runtime import Model
    from ggufrun.settings import Settings

    class Turns:  # the lock, noting when another thread asks for it
        def __init__(self) -> None:
            self.lock, self.asked = threading.Lock(), threading.Event()

        def __enter__(self) -> None:
            if threading.current_thread() is not threading.main_thread():
                self.asked.set()
            self.lock.acquire()

        def __exit__(self, *exc: object) -> None:
            self.lock.release()

    model_path, mmproj = vlm
    with Model.load(model_path, Settings(n_ctx=256, threads=1, batch_size=128, ubatch_size=128)) as model:
        turns = model.serial_compute = Turns()  # type: ignore[assignment]
        proj = Projector(model, mmproj, n_threads=1, use_gpu=False)
        assert model.serial_compute is turns  # the projector takes the model's turns
        got: list[Any] = []
        with turns:  # as while the engine's decode runs
            reader = threading.Thread(target=lambda: got.append(proj.block(load_picture(png(23, 36)))))
            reader.start()
            assert turns.asked.wait(10)  # cut, then waiting for the decode to end
            assert not got and proj.encoded == 0
        reader.join(timeout=10)
        assert got and proj.encoded == 1
        model.decode([(0, model.tokenize("Hello"), True)])  # a decode takes the turn too, and gives it back
        assert not turns.lock.locked()
        proj.close()
    with Model.load(model_path, Settings(n_ctx=256, threads=1, batch_size=128, ubatch_size=128)) as model:
        Projector(model, mmproj, n_threads=1, use_gpu=False).close()
        assert model.serial_compute is not None  # a CPU projector makes the model take turns


# a shape k-quants fit (256-wide rows), with its own output matrix: token_embd then takes the file type's own
# quant, as in published Q4_K_M files (a tied one is the output layer too, and gets Q6_K)
_UNTIED = "llama:layers=2,dim=256,heads=4,kv_heads=2,ff=512,vocab=600,tied=0"


@pytest.mark.parametrize("quant, kind", [("f32", "F32"), ("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0"),
                                         ("q4_k_m", "Q4_K"), ("q6_k", "Q6_K"), ("iq4_xs", "IQ4_XS")])
def test_text_rows_read_from_the_file_decode_bit_for_bit_as_token_ids(tmp_path: Path, quant: str, kind: str) -> None:
    """A SmolVLM prompt goes as one embedding batch, its text as token_embd's rows read by
    llama/text_rows.py: only right if those rows are exactly what llama.cpp's token path looks up
    (a quantized type's through ggml's own to_float, the function get_rows dequantises it with)."""
    import numpy as np

    from ggufrun.llama.text_rows import text_rows
    from ggufrun.llama.vision import _decode_embeddings
    from ggufrun.runtime import Model
    from ggufrun.settings import Settings

    if quant in ("f32", "f16", "q8_0"):
        path = write_synthetic(tmp_path / "m.gguf", "tiny", arch="llama", quant=quant)
    else:  # written by llama.cpp's quantiser (write_synthetic writes neither BF16 nor k-quants)
        from ggufrun.quantize import quantize_file

        shape = "tiny" if quant == "bf16" else _UNTIED
        path = quantize_file(write_synthetic(tmp_path / "f32.gguf", shape, arch="llama", quant="f32"), tmp_path / "m.gguf", quant)
    gemma = write_synthetic(tmp_path / "g.gguf", "tiny", arch="gemma3")
    prompt = [1, *range(5, 60)]
    with Model.load(path, Settings(n_ctx=256, threads=1, batch_size=128, ubatch_size=128)) as model:
        rows = text_rows(model)
        assert rows is not None and rows.kind == kind
        model.decode([(0, prompt, True)])
        by_ids = model.logits_rows(1).copy()
        model.reset(0)
        assert _decode_embeddings(model, [(0, prompt)], rows, [True]) == [len(prompt) - 1]
        assert np.array_equal(model.logits_rows(1), by_ids) and model.seq_len(0) == len(prompt)
        assert not rows.covers([5, rows.n_vocab])  # an id outside the vocabulary: left to the token path's refusal
    with Model.load(gemma, Settings(n_ctx=256, threads=1, batch_size=128, ubatch_size=128)) as model:
        assert text_rows(model) is None  # gemma scales token rows only (not image rows): never mixed
