"""Chat templates: which one a model gets, and turning messages into prompt text.

Choice, first match wins (:func:`select_template`):

1. ``--template NAME`` (``override``): one of the built-in families below;
2. the GGUF's own ``tokenizer.chat_template``, rendered in a sandboxed Jinja environment with the
   helpers Hugging Face templates expect (``raise_exception``, ``strftime_now``, ``bos_token``...);
3. the registry family (or one guessed from the GGUF metadata, :func:`guess_family`).

Built-in families leave the BOS token out: the tokenizer adds it where the model wants one.
Used by both the chat REPL and the server, so this module does no I/O and imports Jinja lazily.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import TemplateError

Message = Mapping[str, Any]
BUILTIN = ("chatml", "gemma", "llama3", "plain")

# End-of-turn markers a GGUF template may use; the ones found in its text become stop strings.
_KNOWN_STOPS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>", "<|END_OF_TURN_TOKEN|>")


def _content(message: Message) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    # OpenAI-style content parts: keep the text parts, in order
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type", "text") == "text")
    return str(content)


def _render_chatml(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    out = [f"<|im_start|>{m['role']}\n{_content(m)}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def _render_gemma(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    # Gemma has no system role: the system text opens the first user turn, as Google's template does.
    system = "\n\n".join(_content(m) for m in messages if m["role"] == "system")
    out = []
    for m in messages:
        role = m["role"]
        if role == "system":
            continue
        text = _content(m)
        if role == "user" and system:
            text, system = f"{system}\n\n{text}", ""
        out.append(f"<start_of_turn>{'model' if role == 'assistant' else 'user'}\n{text.strip()}<end_of_turn>\n")
    if system:  # a system prompt with no user turn yet still reaches the model
        out.insert(0, f"<start_of_turn>user\n{system}<end_of_turn>\n")
    if add_generation_prompt:
        out.append("<start_of_turn>model\n")
    return "".join(out)


def _render_llama3(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    out = [f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{_content(m).strip()}<|eot_id|>" for m in messages]
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


def _render_plain(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    names = {"user": "User", "assistant": "Assistant"}
    out = []
    for m in messages:
        if m["role"] == "system":
            out.append(f"{_content(m)}\n\n")
        else:
            out.append(f"{names.get(m['role'], m['role'].title())}: {_content(m)}\n")
    if add_generation_prompt:
        out.append("Assistant:")
    return "".join(out)


_BUILTIN_RENDER: dict[str, Callable[[Sequence[Message], bool], str]] = {
    "chatml": _render_chatml,
    "gemma": _render_gemma,
    "llama3": _render_llama3,
    "plain": _render_plain,
}
_BUILTIN_STOP: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_end|>",),
    "gemma": ("<end_of_turn>",),
    "llama3": ("<|eot_id|>",),
    "plain": ("\nUser:",),
}


@dataclass(frozen=True)
class ChatTemplate:
    """A chosen template: ``render`` turns messages into prompt text; ``stop`` ends a reply."""

    name: str  # "gguf" for the file's own template, else a built-in family
    source: str  # "gguf" | "family" | "override"
    stop: list[str] = field(default_factory=list)
    jinja_source: str | None = None
    bos_token: str = ""
    eos_token: str = ""

    def describe(self) -> str:
        where = {"gguf": "the GGUF's tokenizer.chat_template", "family": "the model family's built-in template",
                 "override": "--template"}[self.source]
        return f"{self.name} (from {where})"

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True, tools: Sequence[Any] | None = None) -> str:
        """Prompt text for ``messages`` (dicts with role and content; ``tools`` reach a GGUF
        template that renders them, see server/tools.py); raise TemplateError."""
        for m in messages:
            if not isinstance(m, Mapping) or m.get("role") not in ("system", "user", "assistant", "tool"):
                raise TemplateError(f"Invalid chat message {m!r}: role must be system, user or assistant.")
        if self.jinja_source is None:
            return _BUILTIN_RENDER[self.name](messages, add_generation_prompt)
        try:
            return _compile(self.jinja_source).render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=list(tools) if tools else None,
                documents=None,
            )
        except TemplateError:
            raise
        except Exception as exc:  # noqa: BLE001 (a template is code from the file: any failure is the file's)
            raise TemplateError(f"The GGUF's chat template failed to render: {exc}.", "Try --template chatml (or gemma, llama3, plain).") from None


_compiled: dict[str, Any] = {}


def _compile(source: str) -> Any:
    template = _compiled.get(source)
    if template is not None:
        return template
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(f"The GGUF's chat template refused the conversation: {message}")

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    def tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False, ensure_ascii: bool = False) -> str:
        import json

        return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)

    # The same environment transformers uses for apply_chat_template.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        template = env.from_string(source)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"The GGUF's chat template does not parse: {exc}.", "Use --template chatml (or gemma, llama3, plain).") from None
    _compiled[source] = template
    return template


def select_template(
    gguf_template: str | None,
    family: str | None,
    override: str | None = None,
    *,
    bos_token: str = "",
    eos_token: str = "",
) -> ChatTemplate:
    """Choose the template: ``override`` (a built-in name, or "auto"), else the GGUF's own, else
    ``family`` (chatml when unknown). Raise TemplateError for an unknown override."""
    if override and override != "auto":
        name = override.lower()
        if name == "gguf":
            if not gguf_template:
                raise TemplateError("This GGUF has no chat template of its own.", f"Use --template {' or '.join(BUILTIN)}.")
        elif name not in BUILTIN:
            raise TemplateError(f"Unknown template '{override}'.", f"Choose one of: auto, gguf, {', '.join(BUILTIN)}.")
        else:
            return ChatTemplate(name=name, source="override", stop=list(_BUILTIN_STOP[name]))
    if gguf_template and gguf_template.strip():
        stops = [s for s in _KNOWN_STOPS if s in gguf_template]
        if eos_token and eos_token not in stops:
            stops.append(eos_token)
        _compile(gguf_template)  # a template that does not parse fails here, at load, not mid-chat
        source = "override" if override == "gguf" else "gguf"
        return ChatTemplate(name="gguf", source=source, stop=stops, jinja_source=gguf_template, bos_token=bos_token, eos_token=eos_token)
    name = family if family in BUILTIN else "chatml"
    return ChatTemplate(name=name, source="family", stop=list(_BUILTIN_STOP[name]))


def guess_family(metadata: Mapping[str, Any]) -> str:
    """The built-in family for a GGUF with no registry entry, from its metadata; chatml otherwise."""
    arch = str(metadata.get("general.architecture", "")).lower()
    if arch.startswith("gemma"):
        return "gemma"
    # Llama 3 files carry the "llama-bpe" pre-tokenizer; Llama 2 and Mistral files do not.
    if arch == "llama" and str(metadata.get("tokenizer.ggml.pre", "")) == "llama-bpe":
        return "llama3"
    return "chatml"


def split_stop(pending: str, stops: tuple[str, ...] | list[str]) -> tuple[str, str, bool]:
    """Split streamed text into (safe to show, held back, a stop string was hit).

    Text that might be the start of a stop string is held back until the next piece decides,
    so a client never sees half of "<|im_end|>". On a hit, everything from the stop on is dropped.
    """
    hits = [i for i in (pending.find(s) for s in stops if s) if i >= 0]
    if hits:
        return pending[: min(hits)], "", True
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(pending)), hold, -1):
            if pending.endswith(s[:k]):
                hold = k
                break
    return (pending[:-hold], pending[-hold:], False) if hold else (pending, "", False)


def chat_tokens(template: "ChatTemplate", model: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                tools: Sequence[Any] | None = None) -> list[int]:
    """Render ``messages`` with ``template`` and tokenize them for ``model`` (a runtime.Model),
    with BOS added where the model wants one, once: templates that write {{ bos_token }}
    themselves would otherwise start with two."""
    tokens = model.tokenize(template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools), add_special=True, parse_special=True)
    if len(tokens) > 1 and tokens[0] == tokens[1] == model.bos_id:
        del tokens[0]
    return tokens
