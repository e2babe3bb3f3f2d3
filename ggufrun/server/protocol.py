"""OpenAI's request schemas: what the HTTP layer accepts, checked before any work (errors: api_errors.py).

No silent ignoring: every field of the chat, completions and embeddings request schemas is
either honoured or refused with a 400 that names it in ``param`` (OpenAI itself refuses
unknown fields the same way). Errors are ``{"error": {"message", "type", "param", "code"}}``.
Bodies are hostile: depth, lone surrogates and name lengths are checked here, once, so that
nothing later fails with a 500 on them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..settings import coerce
from . import constraints, limits, media
from .api_errors import ApiError, api_error, invalid, unsupported

__all__ = ["ApiError", "api_error", "invalid", "unsupported"]  # re-exported: where callers have always found them

MAX_DEPTH = 64  # the deepest JSON a request needs is a tool schema; 64 levels is far beyond any real one
MAX_NAME = 255  # model names longer than a file name cannot be served names
MAX_N = 16  # choices per request (each one a sequence in the batch)
ROLES = {"system", "user", "assistant", "tool", "developer"}


# ---- the body ------------------------------------------------------------------------------------

def check_tree(value: Any, path: str = "body", depth: int = 0) -> None:
    """Refuse JSON deeper than MAX_DEPTH and strings with lone UTF-16 surrogates (they cannot be
    encoded as UTF-8, so tokenising or logging them would fail later with a 500)."""
    if depth > MAX_DEPTH:
        raise ApiError(400, f"The JSON body is nested deeper than {MAX_DEPTH} levels (at {path}).", param=path)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"Invalid '{path}': the string has a lone UTF-16 surrogate, which is not valid Unicode text.",
                           param=path) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_tree(k, f"{path} key", depth + 1)
            check_tree(v, f"{k}" if path == "body" else f"{path}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_tree(v, f"{path}[{i}]", depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"Invalid '{path}': NaN and Infinity are not JSON numbers.", param=path)


def parse_body(raw: bytes) -> dict[str, Any]:
    """The body as a checked JSON object; 400 for anything else."""
    try:
        data = json.loads(raw or b"null")
    except RecursionError:
        raise ApiError(400, f"The JSON body is nested too deeply (more than {MAX_DEPTH} levels).") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"Malformed JSON body: {exc}.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The body must be a JSON object.")
    check_tree(data)
    return data


def check_fields(body: dict[str, Any], allowed: set[str], refused: dict[str, str], endpoint: str) -> None:
    """Refuse unknown fields and known ones this server cannot honour (when set to a non-default)."""
    for key, value in body.items():
        if key in refused and value is not None and value is not False:
            raise unsupported(key, refused[key])
        if key not in allowed and key not in refused:
            raise ApiError(400, f"Unrecognized request argument supplied to {endpoint}: '{key}'.", param=key)


# ---- field helpers -------------------------------------------------------------------------------

def typed(body: dict[str, Any], key: str, types: tuple[type, ...], what: str, *, param: str | None = None) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in types:
        raise invalid(param or key, f"expected {what}, got {json.dumps(value)}.")
    if not isinstance(value, types):
        raise invalid(param or key, f"expected {what}, got {type(value).__name__}.")
    return value


def setting(body: dict[str, Any], key: str) -> Any:
    """A sampling field checked against the settings model's bounds (one source of limits)."""
    integer = key in ("top_k", "seed", "repeat_last_n")
    value = typed(body, key, (int,) if integer else (int, float), "an integer" if integer else "a number")
    if value is None:
        return None
    if key in ("presence_penalty", "frequency_penalty"):
        if not -2.0 <= value <= 2.0:
            raise invalid(key, f"must be between -2 and 2 (got {value}).")
        return float(value)
    if key == "repeat_last_n":
        if not -1 <= value <= 1 << 20:
            raise invalid(key, f"must be -1 (the whole context), 0 (off) or a token count (got {value}).")
        return value
    try:
        return coerce(key, value, "the request")
    except ConfigError as exc:
        raise ApiError(400, exc.message, param=key) from None


def model_name(body: dict[str, Any]) -> str | None:
    name = typed(body, "model", (str,), "a string")
    if name is not None and len(name) > MAX_NAME:
        raise invalid("model", f"model names are at most {MAX_NAME} characters (got {len(name)}).")
    return name or None


def parse_logit_bias(body: dict[str, Any]) -> dict[int, float] | None:
    bias = typed(body, "logit_bias", (dict,), "an object of token id -> bias")
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) < 10):
            raise invalid("logit_bias", f"keys are token ids (decimal strings), got {key!r}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise invalid("logit_bias", f"the bias for token {key} must be a number from -100 to 100.")
        out[int(key)] = float("-inf") if value <= -100 else float(value)
    return out


# ---- chat and completions ------------------------------------------------------------------------

@dataclass
class GenParams:
    """The generation fields of a completions or chat request, validated."""

    model: str | None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # None = off; else how many alternatives per token
    grammar: str | None = None  # GBNF
    grammar_triggers: list[str] | None = None  # lazy grammar: applied from where one of these patterns matches
    json_schema: dict[str, Any] | None = None  # the schema the reply must validate against (its grammar enforces it)
    grammar_param: str = "grammar"  # the request field the grammar or schema came from, for a 400
    ignore_eos: bool = False
    raw_grammar: bool = False  # the grammar came as llama.cpp's 'grammar' field: it shapes the whole reply, thinking too
    thinking: bool | None = None  # a reasoning model's thinking asked on or off (None: the template's default)
    thinking_param: str = ""  # the field that asked it, named when the model cannot think
    reasoning_budget: int | None = None  # thinking tokens before the block is closed (None: the server's --reasoning-budget)
    budget_param: str = "reasoning_budget"  # the field that set it, named when the model cannot budget
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # chat_template_kwargs: variables for the template
    think: Any = None  # set at render for a reasoning model: reasoning.ThinkBudget (where its reply starts, its budget)
    draft: tuple[int | None, int | None] = (None, None)  # llama-server's speculative.n_max, speculative.n_min
    slot: int | None = None  # llama-server's id_slot: the slot every job of the request runs in
    images: list[Any] = field(default_factory=list)  # set at render: the image embeddings its prompt names (media.py)
    n_ctx: int | None = None  # a smaller context (prompt + reply) for this request: Ollama's options.num_ctx


# llama.cpp server fields we honour on top of OpenAI's.
_LLAMA_FIELDS = {"top_k", "min_p", "repeat_penalty", "repeat_last_n", "ignore_eos", "grammar", "json_schema", "cache_prompt",
                 "speculative.n_max", "speculative.n_min"}
# The chat template's own variables and helpers (templates.py; Jinja's globals), which chat_template_kwargs may
# not replace: a template calling raise_exception must reach ours.
_TEMPLATE_OWN = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "documents", "raise_exception",
                 "strftime_now", "range", "dict", "lipsum", "cycler", "joiner", "namespace", "loop", "self", "varargs", "kwargs"}
_COMMON = {"model", "n", "stream", "stream_options", "max_tokens", "stop", "temperature", "top_p", "seed",
           "presence_penalty", "frequency_penalty", "logit_bias", "user", *_LLAMA_FIELDS}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
                         "parallel_tool_calls", "response_format", "metadata", "store", "service_tier", "modalities",
                         "safety_identifier", "prompt_cache_key", "reasoning_effort", "chat_template_kwargs",
                         "reasoning_budget"}
CHAT_REFUSED = {
    "audio": "this server generates text only.",
    "functions": "the deprecated 'functions' field is not supported; send 'tools' instead.",
    "function_call": "the deprecated 'function_call' field is not supported; send 'tool_choice' instead.",
    "prediction": "predicted outputs are not supported.",
    "verbosity": "the served models have no verbosity control.",
    "web_search_options": "this server has no web search.",
}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "best_of", "echo", "suffix"}
COMPLETION_REFUSED = {"echo": "echoing the prompt is not supported."}  # suffix: fill-in-the-middle (fim.py)
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "user"}
EMBEDDING_REFUSED = {"dimensions": "the embedding size is fixed by the model."}


def parse_gen(body: dict[str, Any], *, chat: bool) -> GenParams:
    """The shared generation fields of a chat or completions body; raise ApiError (400)."""
    model = model_name(body)
    n = typed(body, "n", (int,), "an integer")
    if n is not None and not 1 <= n <= MAX_N:
        raise invalid("n", f"must be between 1 and {MAX_N} (got {n}).")
    stream = bool(typed(body, "stream", (bool,), "true or false"))
    options = typed(body, "stream_options", (dict,), "an object") or {}
    if options and not stream:
        raise invalid("stream_options", "only allowed when 'stream' is true.")
    for key in options:
        if key != "include_usage":
            raise ApiError(400, f"Unrecognized argument 'stream_options.{key}'.", param=f"stream_options.{key}")
    include_usage = typed(options, "include_usage", (bool,), "true or false", param="stream_options.include_usage") is True
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = typed(body, key, (int,), "an integer")
    if max_tokens is not None and max_tokens <= 0:
        raise invalid(key, f"must be >= 1 (got {max_tokens}).")
    stop = typed(body, "stop", (str, list), "a string or a list of strings")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 16 or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop", "expected up to 16 non-empty strings.")
    sampling = {name: v for name in ("temperature", "top_p", "top_k", "min_p", "seed", "repeat_penalty",
                                     "presence_penalty", "frequency_penalty", "repeat_last_n")
                if (v := setting(body, name)) is not None}
    ignore_eos = bool(typed(body, "ignore_eos", (bool,), "true or false"))
    params = GenParams(model=model, n=n or 1, stream=stream, include_usage=include_usage, max_tokens=max_tokens, stop=stops,
                       sampling=sampling, logit_bias=parse_logit_bias(body), ignore_eos=ignore_eos, draft=_draft_bounds(body))
    if chat:
        want = typed(body, "logprobs", (bool,), "true or false")
        top = typed(body, "top_logprobs", (int,), "an integer")
        if top is not None and not 0 <= top <= 20:
            raise invalid("top_logprobs", f"must be between 0 and 20 (got {top}).")
        if top is not None and not want:
            raise invalid("top_logprobs", "needs 'logprobs': true.")
        params.logprobs = (top or 0) if want else None
    else:
        top = typed(body, "logprobs", (int,), "an integer")
        if top is not None and not 0 <= top <= 5:
            raise invalid("logprobs", f"must be between 0 and 5 (got {top}).")
        params.logprobs = top
        best_of = typed(body, "best_of", (int,), "an integer")
        if best_of is not None and best_of != params.n:
            raise unsupported("best_of", "only best_of equal to n (the default) is supported.")
    _parse_constraints(body, params, chat=chat)
    if chat:
        parse_reasoning(body, params)
    _check_metadata(body)
    return params


def _draft_bounds(body: dict[str, Any]) -> tuple[int | None, int | None]:
    """llama-server's ``speculative.n_max`` and ``speculative.n_min``: this request's draft length
    bounds (0..64; n_max 0 drafts nothing)."""
    bounds = []
    for key in ("speculative.n_max", "speculative.n_min"):
        value = typed(body, key, (int,), "an integer")
        if value is not None and not 0 <= value <= 64:
            raise invalid(key, f"must be between 0 and 64 (got {value}).")
        bounds.append(value)
    if bounds[0] is not None and bounds[1] is not None and bounds[1] > bounds[0]:
        raise invalid("speculative.n_min", f"is more than speculative.n_max ({bounds[1]} > {bounds[0]}).")
    return bounds[0], bounds[1]


def parse_reasoning(body: dict[str, Any], params: GenParams) -> None:
    """chat_template_kwargs (enable_thinking), reasoning_effort and reasoning_budget: whether a
    reasoning model thinks and for how long. Whether the model can is checked once it is known."""
    from ..reasoning import EFFORT_BUDGET

    kwargs = typed(body, "chat_template_kwargs", (dict,), "an object of template variables") or {}
    for key in kwargs:
        if not key.isidentifier() or key in _TEMPLATE_OWN or key.startswith("_"):
            raise invalid(f"chat_template_kwargs.{key}", "not a variable a request may set (the template's own, or not a name).")
    enable = kwargs.get("enable_thinking")
    if enable is not None:
        if not isinstance(enable, bool):
            raise invalid("chat_template_kwargs.enable_thinking", "expected true or false.")
        params.thinking, params.thinking_param = enable, "chat_template_kwargs.enable_thinking"
    params.template_kwargs = dict(kwargs)
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in EFFORT_BUDGET:
            raise invalid("reasoning_effort", f"expected one of {', '.join(EFFORT_BUDGET)} (got {json.dumps(effort)}).")
        on = effort != "none"
        if params.thinking is not None and params.thinking != on:
            raise invalid("reasoning_effort", f"'{effort}' contradicts chat_template_kwargs.enable_thinking.")
        params.thinking, params.thinking_param = on, params.thinking_param or "reasoning_effort"
        params.reasoning_budget, params.budget_param = EFFORT_BUDGET[effort], "reasoning_effort"
    budget = typed(body, "reasoning_budget", (int,), "an integer")
    if budget is not None:
        if budget < -1:
            raise invalid("reasoning_budget", f"expected -1 (no limit), 0 (thinking off) or a token count (got {budget}).")
        if budget == 0 and params.thinking:
            raise invalid("reasoning_budget", f"0 turns thinking off, which contradicts {params.thinking_param}.")
        params.reasoning_budget, params.budget_param = budget, "reasoning_budget"


def _check_metadata(body: dict[str, Any]) -> None:
    """Fields that only label a request: accepted when they ask nothing this server cannot do."""
    typed(body, "user", (str,), "a string")
    typed(body, "safety_identifier", (str,), "a string")
    typed(body, "prompt_cache_key", (str,), "a string")  # prefix caching is always on
    meta = typed(body, "metadata", (dict,), "an object of strings")
    if meta and (len(meta) > 16 or not all(isinstance(v, str) for v in meta.values())):
        raise invalid("metadata", "expected up to 16 string values.")
    if body.get("store"):
        raise unsupported("store", "completions are not stored.")
    if body.get("cache_prompt") is False:
        raise unsupported("cache_prompt", "the prompt's KV cache is always reused (false cannot be honoured).")
    tier = body.get("service_tier")
    if tier not in (None, "auto", "default"):
        raise unsupported("service_tier", f"there is only one tier (got {tier!r}).")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise unsupported("modalities", 'only ["text"] output is supported.')


def _parse_constraints(body: dict[str, Any], params: GenParams, *, chat: bool) -> None:
    """response_format / grammar / json_schema, checked here (cheap) and made one GBNF grammar by
    constraints.finish off the event loop (a 400 when a limit or the converter refuses it)."""
    sources = [k for k in ("grammar", "json_schema") if body.get(k) is not None]
    fmt = typed(body, "response_format", (dict,), "an object") if chat else None
    if fmt is not None and fmt.get("type") not in (None, "text"):
        sources.append("response_format")
    if len(sources) > 1:
        raise invalid(sources[1], f"only one of {', '.join(sources)} may constrain the output.")
    if fmt is not None:
        params.json_schema, params.grammar_param = constraints.from_response_format(fmt)
    elif body.get("grammar") is not None:
        grammar = typed(body, "grammar", (str,), "a GBNF grammar string")
        if not grammar.strip():
            raise invalid("grammar", "expected a non-empty GBNF grammar.")
        params.grammar, params.raw_grammar = grammar, True
    elif body.get("json_schema") is not None:
        schema = typed(body, "json_schema", (dict,), "a JSON schema object")
        constraints.check_schema(schema, "json_schema")
        params.json_schema, params.grammar_param = schema, "json_schema"


def text_of(content: Any, where: str) -> str:
    """Message content as text: a string, or a list of text parts joined (as llama-server does)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise invalid(f"{where}[{j}]", f'expected {{"type": "text", "text": "..."}}; {kind!r} parts are not supported '
                              "(the served models read text only).")
            texts.append(part["text"])
        return "\n".join(texts) if len(texts) > 1 else "".join(texts)
    raise invalid(where, "expected a string or a list of content parts.")


def parse_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Messages normalised for any chat template: text content, ``developer`` as ``system``,
    assistant ``tool_calls`` with parsed arguments, ``tool`` turns with their ``tool_call_id``."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "expected a non-empty list of {role, content} objects.")
    limits.check_messages(len(messages))
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise invalid(f"messages[{i}].role", f"expected one of {', '.join(sorted(ROLES))}.")
        role = m["role"]
        allowed = {"role", "content", "name"} | ({"tool_calls", "refusal", "audio", "reasoning_content"} if role == "assistant" else set()) \
            | ({"tool_call_id"} if role == "tool" else set())
        for key in m:
            if key not in allowed:
                raise invalid(f"messages[{i}].{key}", f"not a field of a '{role}' message.")
        if m.get("audio") is not None:
            raise unsupported(f"messages[{i}].audio", "this server generates text only.")
        name = typed(m, "name", (str,), "a string", param=f"messages[{i}].name")
        with_images = media.openai_content(m.get("content"), f"messages[{i}].content") if role == "user" else None
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role,
                               "content": with_images or text_of(m.get("content"), f"messages[{i}].content")}
        if name:
            msg["name"] = name
        reasoning = typed(m, "reasoning_content", (str,), "a string", param=f"messages[{i}].reasoning_content")
        if reasoning:  # a reasoning template (Qwen3's) renders it back where it keeps it; most drop it
            msg["reasoning_content"] = reasoning
        if role == "assistant" and m.get("tool_calls") is not None:
            msg["tool_calls"] = _tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
        elif role == "assistant" and m.get("content") is None and not m.get("refusal"):
            raise invalid(f"messages[{i}].content", "an assistant message needs content or tool_calls.")
        if role == "tool":
            call_id = typed(m, "tool_call_id", (str,), "a string", param=f"messages[{i}].tool_call_id")
            if not call_id:
                raise invalid(f"messages[{i}].tool_call_id", "a tool message needs the id of the call it answers.")
            msg["tool_call_id"] = call_id
        out.append(msg)
    return out


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise invalid(where, "expected a list of tool calls.")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments", ""), str)):
            raise invalid(f"{where}[{j}]", 'expected {"id", "type": "function", "function": {"name", "arguments"}}.')
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            raise invalid(f"{where}[{j}].function.arguments", "expected a JSON object encoded as a string.") from None
        # Templates (Hugging Face's convention) read arguments as a mapping and serialise it themselves.
        out.append({"id": call.get("id") or f"call_{j}", "type": "function",
                    "function": {"name": fn["name"], "arguments": arguments}})
    return out


def parse_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """Completions ``prompt``: a string, a list of strings, a token list or a list of token lists."""
    prompt: Any = body.get("prompt")

    def tokens(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)

    if isinstance(prompt, str):
        limits.check_text_size([prompt], "prompt")  # a prompt's special-token strings are parsed: slow when many
        return [prompt]
    if tokens(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and len(prompt) <= MAX_N and all(isinstance(p, str) or tokens(p) for p in prompt):
        limits.check_text_size([p for p in prompt if isinstance(p, str)], "prompt")
        return list(prompt)
    raise invalid("prompt", f"expected a string, a list of up to {MAX_N} strings, a list of token ids, or a list of such lists.")


@dataclass
class EmbedParams:
    model: str | None
    inputs: list[str | list[int]]
    base64: bool


def parse_embeddings(body: dict[str, Any]) -> EmbedParams:
    check_fields(body, EMBEDDING_FIELDS, EMBEDDING_REFUSED, "/v1/embeddings")
    typed(body, "user", (str,), "a string")
    fmt = body.get("encoding_format")
    if fmt not in (None, "float", "base64"):
        raise invalid("encoding_format", f"expected 'float' or 'base64' (got {fmt!r}).")
    raw: Any = body.get("input")

    def tokens(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)

    if isinstance(raw, str) or tokens(raw):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(t, str) or tokens(t) for t in raw):
        inputs = list(raw)
    else:
        raise invalid("input", "expected a string, a list of strings, a list of token ids, or a list of such lists.")
    if len(inputs) > 256:
        raise invalid("input", f"at most 256 inputs per request (got {len(inputs)}).")
    empty = next((i for i, t in enumerate(inputs) if isinstance(t, str) and not t.strip()), None)
    if empty is not None:
        raise invalid(f"input[{empty}]" if isinstance(raw, list) else "input", "expected non-empty text.")
    return EmbedParams(model=model_name(body), inputs=inputs, base64=fmt == "base64")
