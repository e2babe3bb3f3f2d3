"""Template choice and rendering: built-in families, GGUF Jinja templates in a sandbox, overrides."""

from __future__ import annotations

import pytest

from ggufrun.errors import TemplateError
from ggufrun.templates import BUILTIN, guess_family, select_template

CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a river."},
]

# Qwen2-Instruct's tokenizer.chat_template, as shipped in its GGUF files.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma 2's template: BOS written by the template, raise_exception on a system message.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def test_chatml_family() -> None:
    t = select_template(None, "chatml")
    assert (t.name, t.source, t.stop) == ("chatml", "family", ["<|im_end|>"])
    assert t.render(CONVO) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nName a river.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not t.render(CONVO, add_generation_prompt=False).endswith("<|im_start|>assistant\n")


def test_gemma_family_folds_the_system_prompt_into_the_first_user_turn() -> None:
    t = select_template(None, "gemma")
    assert t.stop == ["<end_of_turn>"]
    assert t.render(CONVO) == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nName a river.<end_of_turn>\n<start_of_turn>model\n"
    )
    assert "system" not in t.render(CONVO)


def test_llama3_and_plain_families() -> None:
    llama3 = select_template(None, "llama3").render(CONVO[:2])
    assert llama3 == ("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                      "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    plain = select_template(None, "plain")
    assert plain.render(CONVO[:2]) == "Be brief.\n\nUser: Hi\nAssistant:"
    assert plain.stop == ["\nUser:"]


def test_unknown_or_missing_family_is_chatml() -> None:
    assert select_template(None, None).name == "chatml"
    assert select_template("", "nonsense").name == "chatml"


def test_gguf_template_wins_over_the_family() -> None:
    t = select_template(QWEN2_TEMPLATE, "gemma", eos_token="<|endoftext|>")
    assert (t.name, t.source) == ("gguf", "gguf")
    assert t.stop == ["<|im_end|>", "<|endoftext|>"]
    assert t.render(CONVO[1:2]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_gguf_template_gets_bos_and_raise_exception() -> None:
    t = select_template(GEMMA2_TEMPLATE, "gemma", bos_token="<bos>")
    assert t.render(CONVO[1:]).startswith("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!")
    with pytest.raises(TemplateError, match="System role not supported"):
        t.render(CONVO)


def test_override_beats_the_gguf_template() -> None:
    t = select_template(QWEN2_TEMPLATE, "chatml", "gemma")
    assert (t.name, t.source) == ("gemma", "override")
    assert select_template(QWEN2_TEMPLATE, "gemma", "auto").name == "gguf"
    assert select_template(QWEN2_TEMPLATE, "gemma", "gguf").source == "override"
    for name in BUILTIN:
        assert select_template(None, None, name.upper()).name == name


def test_bad_override_and_bad_template_are_one_line_errors() -> None:
    with pytest.raises(TemplateError, match="Unknown template 'vicuna'"):
        select_template(None, "chatml", "vicuna")
    with pytest.raises(TemplateError, match="no chat template"):
        select_template(None, "chatml", "gguf")
    with pytest.raises(TemplateError, match="does not parse"):
        select_template("{% for m in messages %}", "chatml")
    broken = select_template("{{ messages[5]['content'] | upper }}", "chatml")
    with pytest.raises(TemplateError, match="failed to render"):
        broken.render(CONVO[:1])


def test_template_runs_in_a_sandbox() -> None:
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TemplateError):
        select_template(escape, "chatml").render(CONVO)
    mutate = "{% set x = messages.append({'role': 'user', 'content': 'x'}) %}{{ messages | length }}"
    with pytest.raises(TemplateError):
        select_template(mutate, "chatml").render(CONVO)


def test_hf_helpers_strftime_now_and_tojson() -> None:
    t = select_template("{{ strftime_now('%Y') }}|{{ messages[0] | tojson }}", "chatml")
    year, _, js = t.render([{"role": "user", "content": "é"}]).partition("|")
    assert year.isdigit() and len(year) == 4
    assert js == '{"role": "user", "content": "é"}'


def test_message_with_a_bad_role_is_rejected() -> None:
    with pytest.raises(TemplateError, match="role"):
        select_template(None, "chatml").render([{"role": "wizard", "content": "x"}])


def test_openai_content_parts_are_joined() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert select_template(None, "chatml").render(parts, add_generation_prompt=False) == "<|im_start|>user\nab<|im_end|>\n"


@pytest.mark.parametrize(("metadata", "family"), [
    ({"general.architecture": "gemma3"}, "gemma"),
    ({"general.architecture": "gemma"}, "gemma"),
    ({"general.architecture": "qwen2"}, "chatml"),
    ({"general.architecture": "llama", "tokenizer.ggml.pre": "llama-bpe"}, "llama3"),
    ({"general.architecture": "llama", "tokenizer.ggml.pre": "default"}, "chatml"),
    ({}, "chatml"),
])
def test_guess_family_from_metadata(metadata: dict[str, str], family: str) -> None:
    assert guess_family(metadata) == family
