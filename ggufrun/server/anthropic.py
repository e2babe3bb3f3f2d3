"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``) over the
server's OpenAI chat pipeline: the request becomes an OpenAI chat body, the results come back
as a Message or as Anthropic's event stream (message_start, content_block_*, message_delta,
message_stop). Errors are ``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import media
from .core import chat_prompt
from .translate import (Refused, body_of, choice_of, chunk_error, guarded, require, sse, start_chat, stream,
                        streamed, text_of, tool_arguments)

if TYPE_CHECKING:
    from .core import Server
    from .translate import ChatRun

# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "cancelled": "end_turn"}
# Fields accepted as they are: metadata.user_id is for the provider's abuse tracking, and
# cache_control marks prompt prefixes, which the engine reuses on its own.
KNOWN = {"model", "max_tokens", "messages", "system", "stop_sequences", "stream", "temperature", "top_p", "top_k",
         "metadata", "tools", "tool_choice", "thinking", "service_tier", "output_config", "cache_control"}
COUNT_KNOWN = {"model", "messages", "system", "tools", "tool_choice", "thinking", "output_config", "cache_control"}
NAMES = {"max_tokens": "max_tokens", "stop": "stop_sequences", "tools": "tools", "tool_choice": "tool_choice",
         "parallel_tool_calls": "tool_choice.disable_parallel_tool_use", "response_format": "output_config.format",
         "chat_template_kwargs.enable_thinking": "thinking", "reasoning_budget": "thinking.budget_tokens",
         "reasoning_effort": "output_config.effort",
         "response_format.json_schema.schema": "output_config.format.schema", "messages": "messages"}


def error_body(status: int, message: str) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _render_error(status: int, kind: str, message: str, param: str | None = None) -> dict[str, Any]:
    return error_body(status, message)


def _message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def _tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise Refused("tools", "'tools' must be a list.")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise Refused(f"tools[{i}]", f"'tools[{i}]' must be an object with a name.")
        if tool.get("type") not in (None, "custom"):
            raise Refused(f"tools[{i}].type", f"Server tool {tool.get('type')!r} is not supported; only client (custom) tools are.")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise Refused(f"tools[{i}].input_schema", f"'tools[{i}].input_schema' must be a JSON schema object.")
        function = {"name": tool["name"], "parameters": schema}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, body: dict[str, Any]) -> None:
    if choice is None:
        return
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise Refused("tool_choice", "'tool_choice.type' must be auto, any, tool or none.")
    kind = choice["type"]
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise Refused("tool_choice.name", "'tool_choice' of type tool needs a name.")
        body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    if choice.get("disable_parallel_tool_use") is True:
        body["parallel_tool_calls"] = False


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Anthropic's system + messages as OpenAI messages (tool_use -> tool_calls, tool_result -> tool)."""
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": text_of(system, "system")})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Refused("messages", "'messages' must be a non-empty list.")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise Refused(f"{where}.role", f"'{where}.role' must be user or assistant.")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list) or not content:
            raise Refused(f"{where}.content", f"'{where}.content' must be a string or a non-empty list of content blocks.")
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[dict[str, Any]] = []
        images: list[tuple[int, dict[str, Any]]] = []  # (texts before it, OpenAI image part)
        for j, block in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "image" and m["role"] == "user":
                images.append((len(texts), media.anthropic_image(block, at)))  # placed before the text that follows it
            elif kind == "thinking" and m["role"] == "assistant" and isinstance(block.get("thinking"), str):
                thoughts.append(block["thinking"])  # sent back: the template renders it where it keeps thinking
            elif kind == "redacted_thinking" and m["role"] == "assistant":
                continue  # another provider's encrypted thinking: nothing a local template can render
            elif kind == "tool_use" and m["role"] == "assistant":
                if not (isinstance(block.get("id"), str) and isinstance(block.get("name"), str) and isinstance(block.get("input"), dict)):
                    raise Refused(at, f"'{at}': a tool_use block needs id, name and an input object.")
                calls.append({"id": block["id"], "type": "function",
                              "function": {"name": block["name"], "arguments": json.dumps(block["input"], ensure_ascii=False)}})
            elif kind == "tool_result" and m["role"] == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise Refused(f"{at}.tool_use_id", f"'{at}.tool_use_id' must be a string.")
                result = text_of(block.get("content", ""), f"{at}.content")
                if block.get("is_error") is True:
                    result = f"Error: {result}"
                out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": result})
            else:
                raise Refused(at, f"'{at}': content of type {kind!r} is not supported here (text, tool_use in assistant turns, tool_result in user turns).")
        if images:
            parts = [{"type": "text", "text": t} for t in texts]
            for k, (at_text, part) in enumerate(images):
                parts.insert(at_text + k, part)
            out.append({"role": "user", "content": parts})
        elif calls:
            out.append({"role": "assistant", "content": "".join(texts) or None, "tool_calls": calls})
        elif texts or m["role"] == "assistant":
            out.append({"role": m["role"], "content": "".join(texts)})
        if thoughts:
            out[-1]["reasoning_content"] = "".join(thoughts)
    return out


def _check_common(body: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise Refused(unknown[0], f"'{unknown[0]}' is not supported.")
    thinking = body.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled") \
                or set(thinking) - {"type", "budget_tokens"}:
            raise Refused("thinking", "'thinking' must be {\"type\": \"enabled\", \"budget_tokens\": N} or {\"type\": \"disabled\"}.")
        budget = thinking.get("budget_tokens")
        if thinking["type"] == "enabled" and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
            raise Refused("thinking.budget_tokens", "'thinking.budget_tokens' must be an integer >= 1.")
        if thinking["type"] == "disabled" and budget is not None:  # a budget for no thinking would do nothing
            raise Refused("thinking.budget_tokens", "'thinking.budget_tokens' is for {\"type\": \"enabled\"} only.")


def _thinking(body: dict[str, Any], out: dict[str, Any]) -> None:
    """Anthropic's ``thinking`` as the pipeline's enable_thinking and reasoning_budget."""
    thinking = body.get("thinking")
    if thinking is None:
        return  # the model's own default (a reasoning template thinks unless told not to)
    enabled = thinking["type"] == "enabled"
    out["chat_template_kwargs"] = {"enable_thinking": enabled}
    if enabled:
        if thinking["budget_tokens"] >= out.get("max_tokens", 1 << 62):  # as Anthropic: the thinking must leave room for the answer
            raise Refused("thinking.budget_tokens", "'thinking.budget_tokens' must be less than max_tokens.")
        out["reasoning_budget"] = thinking["budget_tokens"]


def to_openai(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages request as an OpenAI chat request body; raise Refused."""
    _check_common(body, KNOWN)
    if body.get("service_tier") not in (None, "auto", "standard_only"):
        raise Refused("service_tier", "'service_tier' must be auto or standard_only.")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and set(metadata) <= {"user_id"}):
        raise Refused("metadata", "'metadata' may only hold user_id.")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise Refused("max_tokens", "'max_tokens' is required: an integer >= 1.")
    out: dict[str, Any] = {"messages": _messages(body), "max_tokens": max_tokens}
    temperature = body.get("temperature")
    # Anthropic's range is 0 to 1 (OpenAI's, which the pipeline checks, is wider)
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and not 0 <= temperature <= 1:
        raise Refused("temperature", f"'temperature' must be between 0 and 1 (got {temperature}).")
    for key in ("model", "temperature", "top_p", "top_k", "stream"):
        if body.get(key) is not None:
            out[key] = body[key]
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise Refused("stop_sequences", "'stop_sequences' must be a list of non-empty strings.")
        if stops:
            out["stop"] = stops
    tools = _tools(body)
    if tools:
        out["tools"] = tools
    _tool_choice(body.get("tool_choice"), out)
    _output_config(body.get("output_config"), out)
    _thinking(body, out)
    require(out, NAMES)
    return streamed(out)


def _output_config(config: Any, out: dict[str, Any]) -> None:
    """Structured output (``output_config.format``) as OpenAI's response_format."""
    if config is None:
        return
    if not isinstance(config, dict) or set(config) - {"effort", "format"}:
        raise Refused("output_config", "'output_config' may hold format (and effort).")
    effort = config.get("effort")
    if effort is not None:  # a reasoning model's thinking budget (reasoning.EFFORT_BUDGET); refused where it does not think
        if effort not in ("low", "medium", "high"):
            raise Refused("output_config.effort", "'output_config.effort' must be low, medium or high.")
        out["reasoning_effort"] = effort
    fmt = config.get("format")
    if fmt is None:
        return
    if not (isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict)):
        raise Refused("output_config.format", "'output_config.format' must be {\"type\": \"json_schema\", \"schema\": {...}}.")
    out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True}}


def _usage(usage: dict[str, Any] | None) -> dict[str, int]:
    usage = usage or {}
    return {"input_tokens": usage.get("prompt_tokens", 0), "output_tokens": usage.get("completion_tokens", 0)}


def _stop(run: ChatRun, asked: Sequence[str]) -> str | None:
    """The client's stop sequence that ended the reply (the template's own stops are end_turn)."""
    hit = run.choices.stop_sequences[0]
    return hit if hit in asked else None


def _stop_reason(finish: str, stop: str | None) -> str:
    return "stop_sequence" if stop is not None and finish == "stop" else STOP_REASONS.get(finish, "end_turn")


def from_openai(result: dict[str, Any], stop: str | None = None) -> dict[str, Any]:
    """An OpenAI chat.completion as an Anthropic Message; ``stop``: the client's stop sequence that ended it."""
    choice = result["choices"][0]
    message = choice["message"]
    content: list[dict[str, Any]] = []
    if message.get("reasoning_content"):  # (a local model's thinking carries no signature to check)
        content.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    calls = message.get("tool_calls") or []
    for k, call in enumerate(calls):  # at max_tokens the last call may be cut: its input as far as it got
        cut = choice["finish_reason"] == "length" and k == len(calls) - 1
        content.append({"type": "tool_use", "id": tool_use_id(call["id"]), "name": call["function"]["name"],
                        "input": tool_arguments(call["function"].get("arguments") or "", "tool call's", cut)})
    return {"id": _message_id(), "type": "message", "role": "assistant", "model": result["model"], "content": content,
            "stop_reason": _stop_reason(choice["finish_reason"], stop), "stop_sequence": stop,
            "usage": _usage(result.get("usage"))}


def tool_use_id(call_id: str) -> str:
    """Anthropic's id for a tool call ("toolu_..."), from the engine's OpenAI-style "call_..." one."""
    return f"toolu_{call_id.removeprefix('call_') or uuid.uuid4().hex[:24]}"


def _next_block(index: int, block: dict[str, Any]) -> list[bytes]:
    """The events that close the open content block ``index`` (none when -1) and open ``block`` after it."""
    closing = [sse("content_block_stop", {"type": "content_block_stop", "index": index})] if index >= 0 else []
    return [*closing, sse("content_block_start", {"type": "content_block_start", "index": index + 1, "content_block": block})]


async def events(run: ChatRun, model: str, asked: Sequence[str] = ()) -> AsyncIterator[bytes]:
    """Anthropic's event stream from the OpenAI chunks of ``run``; ``asked``: the client's stop sequences."""
    message: dict[str, Any] = {"id": _message_id(), "type": "message", "role": "assistant", "model": model, "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
    yield sse("message_start", {"type": "message_start", "message": message})
    index = -1  # the open content block, -1 when none is open
    kind = ""  # "text" or "tool:<openai index>"
    finish = "stop"
    async for chunk in run.chunks():
        error = chunk_error(chunk)
        if error is not None:
            status, _, text = error
            yield sse("error", error_body(status, text))
            return
        choice = choice_of(chunk)
        if choice is None:  # the last chunk: usage only
            if index >= 0:
                yield sse("content_block_stop", {"type": "content_block_stop", "index": index})
            usage = _usage(chunk.get("usage"))
            stop = _stop(run, asked)
            yield sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": _stop_reason(finish, stop),
                                                                          "stop_sequence": stop}, "usage": usage})
            yield sse("message_stop", {"type": "message_stop"})
            return
        if choice.get("finish_reason"):
            finish = choice["finish_reason"]
        delta = choice.get("delta") or {}
        if delta.get("reasoning_content"):
            if kind != "thinking":
                for event in _next_block(index, {"type": "thinking", "thinking": "", "signature": ""}):
                    yield event
                index, kind = index + 1, "thinking"
            yield sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                              "delta": {"type": "thinking_delta", "thinking": delta["reasoning_content"]}})
        if delta.get("content"):
            if kind != "text":
                for event in _next_block(index, {"type": "text", "text": ""}):
                    yield event
                index, kind = index + 1, "text"
            yield sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                              "delta": {"type": "text_delta", "text": delta["content"]}})
        for call in delta.get("tool_calls") or []:
            tag = f"tool:{call.get('index', 0)}"
            function = call.get("function") or {}
            if kind != tag:
                block = {"type": "tool_use", "id": tool_use_id(call.get("id") or ""),
                         "name": function.get("name", ""), "input": {}}
                for event in _next_block(index, block):
                    yield event
                index, kind = index + 1, tag
            if function.get("arguments"):
                yield sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                                  "delta": {"type": "input_json_delta", "partial_json": function["arguments"]}})


def routes(server: Server) -> list[Route]:
    """``POST /v1/messages`` and ``POST /v1/messages/count_tokens``."""

    @guarded(_render_error, NAMES)
    async def messages(request: Request) -> Response:
        body = await body_of(server, request)
        openai_body = to_openai(body)
        run = await start_chat(server, openai_body, "/v1/messages")
        model = body.get("model") or run.choices.model
        asked = openai_body.get("stop") or []
        if openai_body.get("stream"):
            return stream(run, events(run, model, asked), "text/event-stream; charset=utf-8")
        result = await run.whole(request)
        if result is None:
            return Response(status_code=499)
        return JSONResponse({**from_openai(result, _stop(run, asked)), "model": model})

    @guarded(_render_error, NAMES)
    async def count_tokens(request: Request) -> Response:
        body = await body_of(server, request)
        _check_common(body, COUNT_KNOWN)
        openai_body: dict[str, Any] = {"model": body.get("model"), "messages": _messages(body)}
        tools = _tools(body)
        if tools:
            openai_body["tools"] = tools
        # Checked as /v1/messages checks them, though only the tools change the count.
        _tool_choice(body.get("tool_choice"), openai_body)
        _output_config(body.get("output_config"), openai_body)
        openai_body.pop("response_format", None)  # (it does not change the prompt)
        _thinking(body, openai_body)
        require(openai_body, NAMES)
        _, tokens = await chat_prompt(server, openai_body)
        return JSONResponse({"input_tokens": len(tokens)})

    return [Route("/v1/messages", messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", count_tokens, methods=["POST"])]
