"""Qwen2.5-VL pictures: M-RoPE positions (an image's rows share a time position and take fewer
positions than rows, so position != index after it) through decode, prefix reuse, trims and the
server, checked token for token against llama-server on the same random-weight files."""

from __future__ import annotations

import base64
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serverutil import ServerProcess

from ggufrun.synthetic import write_synthetic
from ggufrun.synthetic_vision import VISION_TOKENS, write_projector


def noise_png(seed: int, w: int = 80, h: int = 64) -> bytes:
    """Random pixels: a picture whose embeddings differ row by row (a flat colour's barely do)."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# (text shape, projector): Qwen2.5-VL's, and Qwen3-VL's (fused QKV, learned positions, deepstack rows twice as wide)
FAMILIES = {"qwen2.5-vl": ("tiny-qwen2vl", "qwen25vl-tiny"), "qwen3-vl": ("tiny-qwen3vl", "qwen3vl-tiny")}


def _pair(root: Path, family: str) -> tuple[Path, Path]:
    shape, projector = FAMILIES[family]
    # f16: llama-server may run q8_0 through AMX or repacked kernels ggufrun leaves off (bench/vision_load.py says
    # why), and this model's sharp attention turns their last-bit differences into other greedy tokens
    model = write_synthetic(root / "qvl.gguf", shape, quant="f16", extra_tokens=VISION_TOKENS["qwen25vl"])
    return model, write_projector(root / "mmproj.gguf", projector, 64)


@pytest.fixture(scope="module", params=list(FAMILIES))
def qvl(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Qwen-VL text model (M-RoPE sections) and a projector of that family's layout."""
    return _pair(tmp_path_factory.mktemp("qvl"), request.param)


@pytest.fixture(scope="module")
def qvl25(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Qwen2.5-VL's pair alone: for the tests of paths that do not depend on the family."""
    return _pair(tmp_path_factory.mktemp("qvl25"), "qwen2.5-vl")


def _load(pair: tuple[Path, Path]) -> Iterator[tuple[Any, Any]]:
    from ggufrun.llama.vision import Projector
    from ggufrun.runtime import Model
    from ggufrun.settings import Settings

    model = Model.load(pair[0], Settings(n_ctx=1024, threads=1, batch_size=64, ubatch_size=64), n_seq_max=4,
                       kv_cells=1024)
    proj = Projector(model, pair[1], n_threads=1, use_gpu=False)
    yield model, proj
    proj.close()
    model.close()


@pytest.fixture(scope="module")
def loaded(qvl: tuple[Path, Path]) -> Iterator[tuple[Any, Any]]:
    yield from _load(qvl)


@pytest.fixture(scope="module")
def loaded25(qvl25: tuple[Path, Path]) -> Iterator[tuple[Any, Any]]:
    yield from _load(qvl25)


def _prompt(model: Any, proj: Any, seed: int, text: str, held: list[Any]) -> list[int]:
    from ggufrun.images import encode_picture, load_picture

    image = encode_picture(proj, model, load_picture(noise_png(seed)), held)
    return [*model.tokenize("<|im_start|>user\n"), *image, *model.tokenize(f"{text}<|im_end|>\n<|im_start|>assistant\n")]


def _greedy(model: Any, seq: int, tokens: list[int], n: int = 12) -> list[int]:
    """n greedy tokens after ``tokens`` in sequence ``seq``, from what the sequence already holds."""
    keep = model.truncate(seq, min(model.common_prefix(seq, tokens), len(tokens) - 1))
    idx = model.decode([(seq, tokens[keep:], True)])[0]
    out = []
    for _ in range(n):
        tok = model._argmax(idx)
        out.append(tok)
        model.decode([(seq, [tok], True)])
        idx = 0
    return out


def test_an_image_takes_fewer_positions_than_rows_and_text_after_it_goes_on_from_there(loaded: tuple[Any, Any]) -> None:
    model, proj = loaded
    held: list[Any] = []
    tokens = _prompt(model, proj, 1, "what is it", held)
    model.reset(0)
    model.decode([(0, tokens, True)])
    image = held[0]
    assert image.n_tokens == 20 and image.n_pos == 5  # 80x64 px, patch 8, merged 2x2: 5 x 4 rows
    assert image.rows.shape[1] == model.n_embd * (2 if model.metadata["general.architecture"] == "qwen3vl" else 1)
    start = next(i for i, t in enumerate(tokens) if t < 0)
    assert model.mrope.at(0, start + 7) == start  # every row: the image's start
    assert model.mrope.at(0, len(tokens)) == len(tokens) - image.n_tokens + image.n_pos
    whole = _greedy(model, 0, tokens)
    # an image cut between two decodes (the engine's prompt chunks): its later rows keep its start position
    model.reset(0)
    model.decode([(0, tokens[: start + 7], False)])
    model.decode([(0, tokens[start + 7 : -1], False)])
    assert model.mrope.at(0, len(tokens) - 1) == len(tokens) - 1 - image.n_tokens + image.n_pos
    assert _greedy(model, 0, tokens) == whole
    model.reset(0)


def test_a_picture_prompt_in_one_embedding_batch_decodes_as_its_runs_one_by_one(loaded: tuple[Any, Any]) -> None:
    """Text, picture and text go as one embedding batch (the text as token_embd's rows at the token path's
    M-RoPE positions, Qwen3-VL's zero-padded to its deepstack width), as a decode per run gives them:
    equal here; within 0.05 wherever a CPU's kernels round by batch shape, where text after the picture
    at its index instead of its M-RoPE position moves the last logits by ~0.5 (of ~0.7)."""
    import numpy as np

    model, proj = loaded
    held: list[Any] = []
    tokens = _prompt(model, proj, 4, "what is it", held)
    assert model.mixed_runs
    got = []
    for mixed in (True, False):
        model.mixed_runs = mixed
        model.reset()
        try:
            model.decode([(0, tokens, True)])
            got.append(model.logits_rows(1)[0].copy())
        finally:
            model.mixed_runs = True
    assert np.abs(got[0] - got[1]).max() < 0.05
    assert model.mrope.at(0, len(tokens)) == len(tokens) - held[0].n_tokens + held[0].n_pos
    model.reset()


def test_prefix_reuse_and_a_trim_inside_an_image_give_what_a_fresh_decode_gives(loaded: tuple[Any, Any]) -> None:
    model, proj = loaded
    held: list[Any] = []
    first = _prompt(model, proj, 2, "describe", held)
    follow = first + _greedy(model, 1, first, 6) + model.tokenize("<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n")
    model.reset()
    fresh = _greedy(model, 0, follow)
    model.reset()
    _greedy(model, 1, first, 6)  # the first turn; the follow-up reuses its image and text
    assert model.common_prefix(1, follow) > len(first) - 2
    assert _greedy(model, 1, follow) == fresh
    # another picture at the same place: the cut falls on the image's first row
    other = _prompt(model, proj, 3, "describe", held)
    assert model.truncate(1, model.common_prefix(1, other)) == model.common_prefix(1, other)
    want = _greedy(model, 2, other)
    assert _greedy(model, 1, other) == want
    # a cut inside an image moves back to its start (its rows share one position in the KV cache)
    start = next(i for i, t in enumerate(other) if t < 0)
    assert model.truncate(1, start + 5) == start
    assert _greedy(model, 1, other) == want
    # a copied prefix (the engine's donor) carries the image's positions with it
    assert model.copy_prefix(1, 3, len(other) - 1) == len(other) - 1
    assert _greedy(model, 3, other) == want
    model.reset()


def test_two_sequences_pictures_in_one_embedding_batch_give_their_solo_replies(loaded: tuple[Any, Any]) -> None:
    """The engine decodes a step's image rows of several sequences in one batch: each row gets its own sequence's positions."""
    model, proj = loaded
    held: list[Any] = []
    a = _prompt(model, proj, 50, "what is it", held)
    b = model.tokenize("<|im_start|>system\nlook<|im_end|>\n") + _prompt(model, proj, 51, "and this", held)
    model.reset()
    solo = [_greedy(model, 0, a), _greedy(model, 1, b)]
    model.reset()
    starts = [next(i for i, t in enumerate(x) if t < 0) for x in (a, b)]
    ends = [s + next(i for i, t in enumerate(x[s:]) if t >= 0) for s, x in zip(starts, (a, b))]
    model.decode([(2, a[: starts[0]], False), (3, b[: starts[1]], False)])
    model.decode([(2, a[starts[0] : ends[0]], False), (3, b[starts[1] : ends[1]], False)])  # both pictures, one batch
    assert [_greedy(model, 2, a), _greedy(model, 3, b)] == solo
    model.reset()


def test_an_embedding_batch_that_fails_leaves_no_image_in_the_positions(loaded25: tuple[Any, Any]) -> None:
    """A picture begun in a batch that raises before llama_decode (another sequence's image is gone) is
    not kept as begun: text decoded there next takes consecutive positions, not that image's start."""
    from ggufrun.errors import ModelLoadError
    from ggufrun.images import image_tokens

    model, proj = loaded25
    held: list[Any] = []
    a = _prompt(model, proj, 70, "what is it", held)
    start = next(i for i, t in enumerate(a) if t < 0)
    model.reset()
    model.decode([(0, a[:start], False), (1, a[:start], False)])
    with pytest.raises(ModelLoadError, match="no longer held"):
        model.decode([(0, a[start : start + held[0].n_tokens], False), (1, image_tokens(b"gone", 20)[1], False)])
    assert model.seq_len(0) == start
    text = model.tokenize("plain text after all")
    model.decode([(0, text[:1], False)])
    model.decode([(0, text[1:], False)])
    assert model.mrope.at(0, model.seq_len(0)) == model.seq_len(0)
    model.reset()


def test_a_slot_file_with_a_picture_is_refused_on_restore(loaded: tuple[Any, Any], tmp_path: Path) -> None:
    """Its image positions are not in the file's token list: the sequence is left empty, not decoded wrong."""
    from ggufrun.errors import ModelLoadError

    model, proj = loaded
    held: list[Any] = []
    tokens = _prompt(model, proj, 60, "what is it", held)
    model.reset()
    model.decode([(0, tokens, False)])
    model.save_seq(0, tmp_path / "slot.bin")
    with pytest.raises(ModelLoadError, match="holds a picture, which a slot file does not restore"):
        model.load_seq(1, tmp_path / "slot.bin")
    assert model.seq_len(1) == 0
    model.reset()


def test_ngram_drafts_after_a_picture_keep_the_plain_reply(loaded25: tuple[Any, Any]) -> None:
    """Drafts are decoded at the positions after the picture and their rejected tails cut there."""
    from ggufrun.generation import SamplingParams
    from ggufrun.speculative import Guard, NgramDrafter, Speculator

    model, proj = loaded25  # (its replies repeat themselves, so that lookups find drafts)
    held: list[Any] = []
    tokens = _prompt(model, proj, 40, "what is it", held)

    def run() -> list[int]:
        model.reset()
        gen = model.start(tokens, SamplingParams(temperature=0.0), max_tokens=96, ignore_eos=True)
        return [t for t, _ in model.stream(gen, tokens) if t >= 0]

    plain = run()
    class Always(Guard):  # the time guard judges speed; here every step may draft, whatever the clock says
        def tick(self, n: int) -> bool:
            super().tick(n)
            return True

    model.speculator = spec = Speculator(NgramDrafter(), guard=Always())
    try:
        drafted = run()
    finally:
        model.speculator = None
        model.reset()
    assert drafted == plain
    assert spec.stats.drafted > spec.stats.accepted > 0  # drafts kept and drafts cut, after the picture


def _llama_server() -> Path | None:
    given = os.environ.get("LLAMA_BIN")
    if given:
        path = Path(given).expanduser()
        path = path / "llama-server" if path.is_dir() else path
        return path if path.is_file() else None
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    return next(iter(sorted(Path.home().glob(".cache/ggufrun-reference/*/build/bin/llama-server"), reverse=True)), None)


def _chat(url: str, picture: bytes, text: str, n: int = 24, history: list[dict[str, Any]] | None = None) -> tuple[str, dict[str, int]]:
    """A greedy reply's text and usage. A random vocabulary's byte tokens cut UTF-8 characters: a
    cut one at the end is held back by llama-server and shown as U+FFFD by ggufrun, so that is dropped."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    got = client.chat.completions.create(model="m", max_tokens=n, temperature=0, extra_body={"ignore_eos": True},
                                         messages=_messages(picture, text, history))  # type: ignore[arg-type]
    assert got.usage is not None
    text = (got.choices[0].message.content or "").rstrip("\ufffd")
    return text, {"prompt": got.usage.prompt_tokens, "completion": got.usage.completion_tokens}


def test_greedy_replies_equal_llama_servers_on_the_same_files(qvl: tuple[Path, Path], tmp_path: Path) -> None:
    binary = _llama_server()
    if binary is None:
        pytest.skip("no llama-server (set LLAMA_BIN to the reference build's bin folder)")
    model, mmproj = qvl
    pictures = [noise_png(10), noise_png(11, 96, 48), noise_png(10)]  # the third repeats the first: its prefix is reused
    texts = ["what is in the picture", "and this one", "what is in the picture"]
    replies: dict[str, list[tuple[str, dict[str, int]]]] = {}
    for kind in ("ggufrun", "llama-server"):
        common = ["--mmproj", str(mmproj), "--host", "127.0.0.1"]
        if kind == "ggufrun":
            srv = ServerProcess([str(model), *common, "--n-ctx", "1024", "--threads", "1", "--parallel", "1",
                                 "--served-model-name", "m"],
                                env={"GGUFRUN_HOME": str(tmp_path / "home")})
        else:
            srv = ServerProcess(["-m", str(model), *common, "-c", "1024", "-t", "1", "-np", "1", "--no-webui", "-a", "m"],
                                command=[str(binary)])
        try:
            srv.wait_ready(120)
            replies[kind] = [_chat(srv.url, p, t) for p, t in zip(pictures, texts)]
            # a follow-up turn after the picture (its prefix reused on both)
            replies[kind].append(_chat(srv.url, pictures[0], texts[0], history=[
                {"role": "assistant", "content": "a picture of noise"}, {"role": "user", "content": "say more about it"}]))
        finally:
            srv.close()
    ours, theirs = replies["ggufrun"], replies["llama-server"]
    assert [r[0] for r in ours] == [r[0] for r in theirs]
    assert [r[1] for r in ours] == [r[1] for r in theirs]  # an image's rows count as prompt tokens on both
    assert [r[1]["completion"] for r in ours] == [24] * 4
    assert ours[0][0] != ours[1][0]  # two pictures, two replies: the pictures are read


def _messages(picture: bytes, text: str, history: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    url = "data:image/png;base64," + base64.b64encode(picture).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]},
            *(history or [])]


def test_serve_reuses_a_repeated_picture_and_a_follow_up_turn_equals_a_fresh_decode(qvl25: tuple[Path, Path],
                                                                                    tmp_path: Path) -> None:
    import openai

    model, mmproj = qvl25
    srv = ServerProcess([str(model), "--mmproj", str(mmproj), "--n-ctx", "1024", "--threads", "1", "--parallel", "1",
                         "--served-model-name", "m"], env={"GGUFRUN_HOME": str(tmp_path / "home")})
    try:
        srv.wait_ready(120)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)

        def ask(messages: list[dict[str, Any]]) -> Any:
            return client.chat.completions.create(model="m", max_tokens=12, temperature=0, messages=messages,  # type: ignore[arg-type]
                                                  extra_body={"ignore_eos": True})

        first = ask(_messages(noise_png(20), "what is it"))
        again = ask(_messages(noise_png(20), "what is it"))
        assert again.choices[0].message.content == first.choices[0].message.content
        assert again.usage.prompt_tokens == first.usage.prompt_tokens > 20  # the picture's 20 rows count
        assert again.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - 1
        turn = _messages(noise_png(20), "what is it", [{"role": "assistant", "content": first.choices[0].message.content},
                                                      {"role": "user", "content": "say more"}])
        follow = ask(turn)
        assert follow.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1  # picture and turn reused
        ask(_messages(noise_png(21), "what is it"))  # another picture takes the slot from the first one's row 0 on
        fresh = ask(turn)
        assert fresh.usage.prompt_tokens_details.cached_tokens <= first.usage.prompt_tokens - 20 - 1  # text before the picture only
        assert fresh.choices[0].message.content == follow.choices[0].message.content
    finally:
        srv.close()


def test_chat_cli_image_with_p(qvl25: tuple[Path, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    model, mmproj = qvl25
    picture = tmp_path / "noise.png"
    picture.write_bytes(noise_png(30))
    proc = subprocess.run([sys.executable, "-m", "ggufrun.cli.main", "chat", str(model), "--mmproj", str(mmproj),
                           "--image", str(picture), "-p", "what is it", "--temperature", "0", "--max-tokens", "8"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "GGUFRUN_HOME": str(tmp_path / "h")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()


def test_qwen_projector_checks_refuse_what_libmtmd_would_abort_on_or_misread(tmp_path: Path) -> None:
    import gguf

    from ggufrun.errors import InvalidGGUFError, ModelLoadError
    from ggufrun.llama.vision import Projector
    from ggufrun.projector_info import inspect_projector
    from ggufrun.runtime import Model
    from ggufrun.settings import Settings

    q25, _ = _pair(tmp_path / "a", "qwen2.5-vl")
    q3proj = write_projector(tmp_path / "q3.gguf", "qwen3vl-tiny", 64)
    assert inspect_projector(q3proj).deepstack == 1
    # a Qwen3-VL projector's rows (deepstack: twice the width) on a text model that reads one width: libmtmd says so
    with Model.load(q25, Settings(n_ctx=256, threads=1)) as model:
        with pytest.raises(ModelLoadError, match="mismatch between text model"):
            Projector(model, q3proj, n_threads=1, use_gpu=False)
    # clip.cpp asserts (aborts the process) on a Qwen3-VL projector without its learned positions
    reader = gguf.GGUFReader(q3proj)
    w = gguf.GGUFWriter(tmp_path / "broken.gguf", "clip")
    for field in reader.fields.values():
        if field.name.startswith("clip."):
            value = field.contents()
            if isinstance(value, bool):
                w.add_bool(field.name, value)
            elif isinstance(value, int):
                w.add_uint32(field.name, value)
            elif isinstance(value, float):
                w.add_float32(field.name, value)
            elif isinstance(value, str):
                w.add_string(field.name, value)
            else:
                w.add_array(field.name, value)
    for t in reader.tensors:
        if t.name != "v.position_embd.weight":
            w.add_tensor(t.name, t.data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InvalidGGUFError, match="v.position_embd.weight"):
        inspect_projector(tmp_path / "broken.gguf")


@pytest.mark.parametrize("kind,tensor", [("qwen25vl", "v.blk.0.ffn_gate.weight"), ("qwen25vl", "v.blk.1.attn_q.bias"),
                                         ("qwen25vl", "mm.0.bias"), ("qwen3vl", "v.deepstack.0.fc1.bias"),
                                         ("qwen3vl", "v.post_ln.weight")])
def test_a_gate_norm_or_bias_of_another_shape_is_refused_before_ggml_asserts(kind: str, tensor: str, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of these, twice as wide as its layer, aborted the process on the first picture (GGML_ASSERT in
    ggml_add / ggml_mul): the header check names it instead."""
    import ggufrun.synthetic_vision as sv
    from ggufrun.errors import InvalidGGUFError
    from ggufrun.projector_info import inspect_projector

    name = {"qwen25vl": "_plan_qwen25vl", "qwen3vl": "_plan_qwen3vl"}[kind]
    plan = getattr(sv, name)
    monkeypatch.setattr(sv, name, lambda spec, width: [(n, (*s[:-1], 2 * s[-1]) if n == tensor else s, t, f)
                                                       for n, s, t, f in plan(spec, width)])
    with pytest.raises(InvalidGGUFError, match=f"tensor {tensor} has shape"):
        inspect_projector(sv.write_projector(tmp_path / "p.gguf", f"{kind}-tiny", 64))


@pytest.mark.parametrize("kind,tensor", [("qwen25vl", "v.patch_embd.bias"), ("qwen3vl", "v.class_embd")])
def test_a_tensor_clip_cpp_asserts_a_qwen_projector_lacks_is_refused(kind: str, tensor: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """clip.cpp's Qwen graphs abort the process on the first picture where these are present."""
    import ggufrun.synthetic_vision as sv
    from ggufrun.errors import InvalidGGUFError
    from ggufrun.projector_info import inspect_projector

    name = {"qwen25vl": "_plan_qwen25vl", "qwen3vl": "_plan_qwen3vl"}[kind]
    plan = getattr(sv, name)
    monkeypatch.setattr(sv, name, lambda spec, width: [*plan(spec, width), (tensor, (32,), "F32", "bias")])
    with pytest.raises(InvalidGGUFError, match=f"tensor {tensor} is not one a"):
        inspect_projector(sv.write_projector(tmp_path / "p.gguf", f"{kind}-tiny", 64))


def test_a_qwen25_patch_wider_than_its_attention_window_is_refused(tmp_path: Path) -> None:
    """clip.cpp cuts a Qwen2.5-VL picture into 112-pixel windows of 2x2 patches: with patches over 56 pixels
    a window holds none and its loop never ends (the first picture's encode hung, its request with it)."""
    import dataclasses

    from ggufrun.errors import InvalidGGUFError
    from ggufrun.projector_info import inspect_projector
    from ggufrun.synthetic_vision import PROJECTORS

    wide = dataclasses.replace(PROJECTORS["qwen25vl-tiny"], patch_size=64, image_size=256)
    with pytest.raises(InvalidGGUFError, match="patch size 64 is over 56"):
        inspect_projector(write_projector(tmp_path / "p.gguf", wide, 64))


def test_a_deepstack_layer_without_its_second_layer_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """clip.cpp takes a layer with a deepstack fc1 as a deepstack layer: one without its fc2 aborted the process
    on the first picture, and the check (keyed on fc2) counted it out and let the file through."""
    import ggufrun.synthetic_vision as sv
    from ggufrun.errors import InvalidGGUFError
    from ggufrun.projector_info import inspect_projector

    plan = sv._plan_qwen3vl
    monkeypatch.setattr(sv, "_plan_qwen3vl", lambda spec, width: [*plan(spec, width),
                                                                  ("v.deepstack.1.fc1.weight", (128, 128), "F16", "weight")])
    with pytest.raises(InvalidGGUFError, match="tensor v.deepstack.1.norm.weight is missing"):
        inspect_projector(sv.write_projector(tmp_path / "p.gguf", "qwen3vl-tiny", 64))


def test_show_says_a_qwen_model_sees_pictures_of_any_size(qvl25: tuple[Path, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    model, mmproj = qvl25
    proc = subprocess.run([sys.executable, "-m", "ggufrun.cli.main", "show", str(model), "--mmproj", str(mmproj)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "GGUFRUN_HOME": str(tmp_path), "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "yes (qwen2.5vl_merger: any size, 16 tokens at 64 px; M-RoPE)" in proc.stdout
