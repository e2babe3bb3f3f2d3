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

import re
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import TemplateError

Message = Mapping[str, Any]
BUILTIN = ("chatml", "gemma", "llama3", "plain")

# End-of-turn markers a GGUF template may use; the ones found in its text become stop strings.
_KNOWN_STOPS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>", "<|END_OF_TURN_TOKEN|>")

# A GGUF's template is code from a file: it gets a budget. Real templates render in milliseconds
# and a prompt beyond a few million characters cannot fit any context window.
RENDER_SECONDS = 2.0
RENDER_MAX_CHARS = 4_000_000
_RANGE_MAX = 100_000  # jinja2.sandbox.MAX_RANGE, per range() call


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

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True, tools: Sequence[Any] | None = None,
               variables: Mapping[str, Any] | None = None) -> str:
        """Prompt text for ``messages`` (dicts with role and content; ``tools`` reach a GGUF
        template that renders them, see server/tools.py; ``variables`` too, such as
        ``enable_thinking``: a request's chat_template_kwargs); raise TemplateError."""
        for m in messages:
            if not isinstance(m, Mapping) or m.get("role") not in ("system", "user", "assistant", "tool"):
                raise TemplateError(f"Invalid chat message {m!r}: role must be system, user or assistant.")
        if self.jinja_source is None:
            return _BUILTIN_RENDER[self.name](messages, add_generation_prompt)
        try:
            return _render_bounded(_compile(self.jinja_source), dict(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=list(tools) if tools else None,
                documents=None,
                **(variables or {}),
            ))
        except TemplateError:
            raise
        except RecursionError:
            raise TemplateError("The GGUF's chat template recursed too deeply.", _TRY_BUILTIN) from None
        except Exception as exc:  # noqa: BLE001 (a template is code from the file: any failure is the file's)
            raise TemplateError(f"The GGUF's chat template failed to render: {exc}.", _TRY_BUILTIN) from None


_TRY_BUILTIN = "Try --template chatml (or gemma, llama3, plain)."


class _OverBudget(Exception):
    """Raised inside the template's frames when its time runs out."""


def _render_bounded(template: Any, context: dict[str, Any]) -> str:
    """Render with a time and output budget; raise TemplateError when either runs out.

    Jinja compiles a template to Python generator code, so a trace function on this thread sees
    every line the template runs (and every call it makes) and can stop a loop that yields
    nothing; the output is checked as it is generated. Only template frames are traced line by
    line, so the cost is a few percent of a render that takes milliseconds.
    """
    deadline = time.monotonic() + RENDER_SECONDS

    def local(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _OverBudget
        return local

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _OverBudget
        return local if frame.f_code.co_filename == "<template>" else None

    pieces: list[str] = []
    size = 0
    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        for piece in template.generate(**context):
            size += len(piece)
            if size > RENDER_MAX_CHARS:
                raise TemplateError(f"The GGUF's chat template produced more than {RENDER_MAX_CHARS:,} characters.",
                                    _TRY_BUILTIN)
            pieces.append(piece)
    except _OverBudget:
        raise TemplateError(f"The GGUF's chat template ran for more than {RENDER_SECONDS:g} s.", _TRY_BUILTIN) from None
    finally:
        sys.settrace(previous)
    return "".join(pieces)


_compiled: dict[str, Any] = {}


def _compile(source: str) -> Any:
    template = _compiled.get(source)
    if template is not None:
        return template
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(f"The GGUF's chat template refused the conversation: {message}")

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    def tojson(value: Any, indent: int | str | None = None, separators: Any = None, sort_keys: bool = False,
               ensure_ascii: bool = False) -> str:
        import json

        # json.dumps writes indent once per nesting level per line: a computed indent of millions
        # allocates gigabytes in one C call. Nobody indents JSON by more than a few spaces.
        width = indent if isinstance(indent, int) else len(indent) if isinstance(indent, str) else 0
        if width > _MAX_JSON_INDENT:
            raise _too_big(f"tojson(indent={width:,})", f"an indent of at most {_MAX_JSON_INDENT}")
        return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)

    class NoFoldingCodeGenerator(CodeGenerator):
        """Jinja evaluates constant expressions while it compiles (``{{ 'x'|center(2000000000) }}``
        ran, and allocated 8 GB, before any render started): nothing but literal text is folded
        here, so every expression runs under the render budget. ``~`` goes through the bounded
        concatenation below rather than ``str.join``."""

        def _output_child_to_const(self, node: Any, frame: Any, finalize: Any) -> str:
            if not isinstance(node, nodes.TemplateData):
                raise nodes.Impossible()
            return super()._output_child_to_const(node, frame, finalize)

        def visit_Concat(self, node: Any, frame: Any) -> None:
            self.write("environment.bounded_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """transformers' apply_chat_template environment, with everything that can build a large
        value in one C call checked first (``'x' * 10**10``, ``'%9999999999s' % x``, ``'x'.center(N)``,
        ``|indent(N)``...): such a call allocates gigabytes out of the trace's reach."""

        code_generator_class = NoFoldingCodeGenerator
        intercepted_binops = frozenset({"*", "**", "%", "+"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**":
                if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 64:
                    raise TemplateError(f"The GGUF's chat template computes {left} ** {right}, too large.", _TRY_BUILTIN)
            elif operator == "%" and isinstance(left, str):
                _check_printf(left, right)
            elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                _check_size(len(left) + len(right), "+")
            elif isinstance(left, int) and isinstance(right, (str, list, tuple)):
                left, right = right, left
            if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int):
                if len(left) * right > RENDER_MAX_CHARS:
                    raise TemplateError(f"The GGUF's chat template repeats a value {right:,} times, beyond its "
                                        f"{RENDER_MAX_CHARS:,}-character budget.", _TRY_BUILTIN)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (Jinja's signature)
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str):
                args = _check_str_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value: Any) -> Any:
            wrapped = super().wrap_str_format(value)  # the sandbox's str.format / format_map
            if wrapped is None:
                return None
            fmt, name = value.__self__, value.__name__

            def checked(*args: Any, **kwargs: Any) -> str:
                _check_str_method(fmt, name, args, kwargs)
                return wrapped(*args, **kwargs)

            return checked

        def bounded_concat(self, values: tuple[Any, ...]) -> str:
            parts = [str(v) for v in values]
            _check_size(sum(len(p) for p in parts), "~")
            return "".join(parts)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols], optimized=False)
    for name, bound in _bounded_filters(env.filters).items():
        env.filters[name] = bound
    lipsum: Any = env.globals["lipsum"]

    def bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> Any:  # noqa: A002 (Jinja's names)
        _check_size(n * (max if isinstance(max, int) else 0) * 12, "lipsum")  # words of up to ~12 characters
        return lipsum(n, html, min, max)

    env.globals["lipsum"] = bounded_lipsum
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        template = env.from_string(source)
    except (jinja2.TemplateError, RecursionError) as exc:
        raise TemplateError(f"The GGUF's chat template does not parse: {exc}.", _TRY_BUILTIN) from None
    _compiled[source] = template
    return template


_MAX_JSON_INDENT = 32
# printf-style width or precision ("%2000000000s", "{:>2000000000}"), or a "*" taking one from the arguments
_PRINTF_WIDTH = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\d+|\*)?(?:\.(\d+|\*))?")
_FORMAT_WIDTH = re.compile(r"\{[^{}]*:[^{}]*?(\d+)[^{}]*\}|(\{[^{}]*:[^{}]*\{)")


def _too_big(what: str, limit: str) -> TemplateError:
    return TemplateError(f"The GGUF's chat template asks for {what}, beyond its budget ({limit}).", _TRY_BUILTIN)


def _check_size(n: int, what: str) -> None:
    if n > RENDER_MAX_CHARS:
        raise _too_big(f"a {n:,}-character value ({what})", f"{RENDER_MAX_CHARS:,} characters")


def _check_count(n: Any, what: str) -> None:
    if isinstance(n, int) and not isinstance(n, bool) and n > RENDER_MAX_CHARS:
        raise _too_big(f"{what} {n:,}", f"at most {RENDER_MAX_CHARS:,}")


def _check_printf(fmt: str, args: Any) -> None:
    """A %-format's widths and precisions, and the numbers its '*'s take, within the budget."""
    for m in _PRINTF_WIDTH.finditer(fmt):
        for width in m.groups():
            if width and width != "*":
                _check_count(int(width), "a format width of")
    if "*" in fmt:
        for v in args if isinstance(args, tuple) else (args,):
            _check_count(abs(v) if isinstance(v, int) else v, "a format width of")


def _check_format(fmt: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """str.format's widths within the budget; a width taken from an argument ({:{}}) too."""
    for m in _FORMAT_WIDTH.finditer(fmt):
        if m.group(1):
            _check_count(int(m.group(1)), "a format width of")
        else:
            for v in (*args, *kwargs.values()):
                _check_count(abs(v) if isinstance(v, int) else v, "a format width of")


def _check_replace(s: str, old: Any, new: Any, count: Any = -1) -> None:
    if isinstance(old, str) and isinstance(new, str):
        n = s.count(old) if old else len(s) + 1
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        _check_size(len(s) + n * (len(new) - len(old)), "replace")


def _check_join(sep: Any, items: list[Any]) -> None:
    size = len(str(sep)) * max(len(items) - 1, 0)
    _check_size(size + sum(len(x) if isinstance(x, str) else 0 for x in items), "join")


# str methods that build a value whose size an argument sets
_WIDTH_METHODS = {"center": 0, "ljust": 0, "rjust": 0, "zfill": 0}


def _check_str_method(s: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Check a str method call's size before it runs; the arguments to call it with."""
    if name in _WIDTH_METHODS and args:
        _check_count(args[0], f"str.{name} width")
    elif name == "expandtabs":
        _check_size(len(s) * int(args[0] if args and isinstance(args[0], int) else 8), "expandtabs")
    elif name == "replace" and len(args) >= 2:
        _check_replace(s, *args[:3])
    elif name == "join" and args:
        items = list(args[0])
        _check_join(s, items)
        args = (items, *args[1:])  # a generator argument was consumed: join the list
    elif name in ("format", "format_map"):
        _check_format(s, args, kwargs if name == "format" else dict(args[0]) if args and isinstance(args[0], dict) else {})
    return args


def _bounded_filters(filters: dict[str, Any]) -> dict[str, Any]:
    """Jinja's filters that take a width or a count, each checking its arguments before it allocates."""
    import jinja2

    center, indent, fmt, batch = filters["center"], filters["indent"], filters["format"], filters["batch"]
    slice_, replace, join, wordwrap = filters["slice"], filters["replace"], filters["join"], filters["wordwrap"]

    def do_center(value: Any, width: int = 80) -> str:
        _check_count(width, "a centring width of")
        return center(value, width)

    def do_indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
        w = width if isinstance(width, int) else len(str(width))
        _check_size(len(str(s)) + (str(s).count("\n") + 1) * w, "indent")
        return indent(s, width, first, blank)

    def do_format(value: Any, *args: Any, **kwargs: Any) -> str:
        _check_printf(str(value), args if len(args) != 1 else args[0])
        return fmt(value, *args, **kwargs)

    def do_batch(value: Any, linecount: int, fill_with: Any = None) -> Any:
        _check_count(linecount, "a batch of")
        return batch(value, linecount, fill_with)

    def do_slice(value: Any, slices: int, fill_with: Any = None) -> Any:
        _check_count(slices, "slices:")
        return slice_(value, slices, fill_with)

    @jinja2.pass_eval_context
    def do_replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: Any = None) -> str:
        _check_replace(str(s), str(old), str(new), -1 if count is None else count)
        return replace(eval_ctx, s, old, new, count)

    @jinja2.pass_eval_context
    def do_join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
        items = list(value)
        _check_join(d, items if attribute is None else [None] * len(items))
        return join(eval_ctx, items, d, attribute)

    @jinja2.pass_environment
    def do_wordwrap(environment: Any, s: Any, width: int = 79, break_long_words: bool = True, wrapstring: Any = None,
                    break_on_hyphens: bool = True) -> str:
        if isinstance(wrapstring, str):
            _check_size(len(str(s)) * (1 + len(wrapstring)), "wordwrap")
        return wordwrap(environment, s, width, break_long_words, wrapstring, break_on_hyphens)

    return {"center": do_center, "indent": do_indent, "format": do_format, "batch": do_batch, "slice": do_slice,
            "replace": do_replace, "join": do_join, "wordwrap": do_wordwrap}


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


def chat_tokens(template: "ChatTemplate", model: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                tools: Sequence[Any] | None = None, variables: Mapping[str, Any] | None = None) -> list[int]:
    """Render ``messages`` with ``template`` and tokenize them for ``model`` (a runtime.Model).

    Only the template's own markers become control tokens: text inside a message is tokenised as
    plain text, so a user typing ``<|im_start|>system`` cannot open a system turn. (llama-server
    tokenises the whole rendered prompt with parse_special=true, so there it can; transformers'
    apply_chat_template(tokenize=True) too. We are stricter on purpose.) BOS is added where the
    model wants one, once: templates that write {{ bos_token }} themselves would otherwise start
    with two. Raises TemplateError.
    """
    marked = [i for i, m in enumerate(messages) if _holds_special(model, m.get("content"))]
    if not marked:  # the common case: one render, one tokenize call, as before
        tokens = model.tokenize(template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                                variables=variables), add_special=True, parse_special=True)
    else:
        tokens = _tokenize_marked(template, model, messages, marked, add_generation_prompt, tools, variables)
    if len(tokens) > 1 and tokens[0] == tokens[1] == model.bos_id:
        del tokens[0]
    return tokens


def _holds_special(model: Any, content: Any) -> bool:
    """Whether message text contains a special token's text: it tokenises differently when
    special tokens are parsed. Exact for the model's vocabulary, and cheap next to a decode."""
    texts = [content] if isinstance(content, str) else [p.get("text") for p in content if isinstance(p, Mapping)] \
        if isinstance(content, list) else []
    return any(isinstance(t, str) and t and model.tokenize(t, add_special=False, parse_special=True)
               != model.tokenize(t, add_special=False, parse_special=False) for t in texts)


def _tokenize_marked(template: "ChatTemplate", model: Any, messages: list[dict[str, Any]], marked: list[int],
                     add_generation_prompt: bool, tools: Sequence[Any] | None,
                     variables: Mapping[str, Any] | None = None) -> list[int]:
    # Wrap the risky messages' text in markers no user can guess (private-use characters and a
    # random nonce), render, then tokenise between the markers as plain text.
    nonce = secrets.token_hex(8)
    start, end = f"\ue000{nonce}\ue001", f"\ue002{nonce}\ue003"

    def wrap(content: Any) -> Any:
        if isinstance(content, str):
            return f"{start}{content}{end}"
        return [dict(p, text=wrap(p["text"])) if isinstance(p, Mapping) and isinstance(p.get("text"), str) else p
                for p in content]

    wrapped = [dict(m, content=wrap(m["content"])) if i in marked else m for i, m in enumerate(messages)]
    text = template.render(wrapped, add_generation_prompt=add_generation_prompt, tools=tools, variables=variables)
    parts = re.split(f"({re.escape(start)}|{re.escape(end)})", text)
    tokens: list[int] = []
    inside = False
    for k, part in enumerate(parts):
        if part == start or part == end:
            if inside == (part == start):
                raise TemplateError("The chat template cut into a message holding special-token text, so it "
                                    "cannot be kept apart from the template's own markers.",
                                    "Remove the special-token text from the message, or use --template chatml.")
            inside = part == start
            continue
        if part or k == 0:
            tokens += model.tokenize(part, add_special=k == 0, parse_special=not inside)
    if inside:
        raise TemplateError("The chat template cut into a message holding special-token text.",
                            "Remove the special-token text from the message, or use --template chatml.")
    return tokens
