"""Vision: synthetic projectors of real layouts that libmtmd loads, the checks before it does, images
encoded and decoded beside text in the engine's batches, and every API sending real PNG/JPEG bytes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert got["seq"] == 1 + got["n"] + 2 and got["out"] == [2]  # image rows took their positions; logits of the last text run
    assert got["same"]  # the same bytes give the same image tokens: prefix reuse
    if kind.startswith("smolvlm"):
        # a 40x30 picture: one 32 px tile and the overview, 4 tokens each, framed by idefics3's markers
        assert got["images"] == [[4, 64], [4, 64]] and "<global-img>" in got["text"] and not got["non_causal"]
    else:
        assert got["images"] == [[4, 64]] and "<start_of_image>" in got["text"] and got["non_causal"]


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


def test_prompt_chunks_stop_where_text_and_images_meet() -> None:
    assert run_end([5, 6, -3, -4, 7], 10) == 2
    assert run_end([-3, -4, 7], 10) == 2
    assert run_end([-3, -4, -5], 2) == 2
    assert run_end([], 4) == 0
