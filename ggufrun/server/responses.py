"""OpenAI's Responses API (``POST /v1/responses``) over the server's chat pipeline: input items
and instructions become chat messages, function tools become chat tools, and the result comes
back as a Response object or as its event stream (response.created ... response.completed).
Nothing is stored, so ``store: true`` and ``previous_response_id`` are refused. Errors are in
OpenAI's shape, as the Responses API's are.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import media
from .protocol import ApiError
from .translate import (Refused, body_of, choice_of, chunk_error, guarded, require, sse, start_chat, stream, streamed,
                        text_of)

if TYPE_CHECKING:
    from .core import Server
    from .translate import ChatRun

KNOWN = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "tools", "tool_choice",
         "parallel_tool_calls", "text", "store", "previous_response_id", "metadata", "user", "reasoning", "truncation",
         "include", "top_logprobs", "service_tier", "background", "prompt_cache_key", "safety_identifier", "stream_options",
         "max_tool_calls", "conversation", "prompt", *("top_k", "min_p", "seed", "repeat_penalty")}
# llama.cpp's sampling fields, taken here as llama-server takes them on its OpenAI routes.
EXTRAS = ("top_k", "min_p", "seed", "repeat_penalty")
NAMES = {"max_tokens": "max_output_tokens", "response_format": "text.format", "tools": "tools", "tool_choice": "tool_choice",
         "parallel_tool_calls": "parallel_tool_calls", "logprobs": "top_logprobs", "top_logprobs": "top_logprobs",
         "reasoning_effort": "reasoning.effort",
         "response_format.json_schema.schema": "text.format.schema", "messages": "input"}
# include values that need nothing from us: reasoning items carry their text in the clear, nothing is encrypted.
# "message.output_text.logprobs" is honoured (see to_openai).
HARMLESS_INCLUDES = {"reasoning.encrypted_content", "message.output_text.logprobs"}


def _render_error(status: int, kind: str, message: str, param: str | None = None) -> dict[str, Any]:
    return ApiError(status, message, kind=kind, param=param).body()


def _refuse_set(body: dict[str, Any]) -> None:
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise Refused(unknown[0], f"Unknown parameter: '{unknown[0]}'.")
    for key, why in (("previous_response_id", "responses are not stored"), ("conversation", "conversations are not stored"),
                     ("prompt", "stored prompts are not supported"), ("max_tool_calls", "'max_tool_calls' is not supported")):
        if body.get(key) is not None:
            raise Refused(key, f"'{key}' is not supported: {why}; send the whole conversation as input.")
    if body.get("store") is True:
        raise Refused("store", "'store': true is not supported: ggufrun does not store responses; send store: false.")
    if body.get("background") is True:
        raise Refused("background", "'background': true is not supported.")
    if body.get("truncation") not in (None, "disabled"):
        raise Refused("truncation", "'truncation' must be disabled: a conversation longer than the context is refused, not cut.")
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict) or set(reasoning) - {"effort", "summary", "generate_summary"}:
            raise Refused("reasoning", "'reasoning' may hold effort (and summary).")
        for key in ("summary", "generate_summary"):
            if reasoning.get(key) is not None:
                raise Refused(f"reasoning.{key}", f"'reasoning.{key}' is not supported: a local model's thinking is returned "
                                                  "whole (reasoning items' content), not summarised.")
    include = body.get("include") or []
    if not isinstance(include, list) or any(not isinstance(i, str) or i not in HARMLESS_INCLUDES for i in include):
        raise Refused("include", f"'include' may only hold {', '.join(sorted(HARMLESS_INCLUDES))}.")
    if body.get("service_tier") not in (None, "auto", "default"):
        raise Refused("service_tier", "'service_tier' must be auto or default.")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise Refused("metadata", "'metadata' must map strings to strings.")


def _text(content: Any, where: str) -> str:
    return text_of(content, where, ("input_text", "output_text", "text"))


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise Refused("instructions", "'instructions' must be a string.")
        out.append({"role": "system", "content": instructions})
    thought = ""  # a reasoning item sent back: it belongs to the assistant turn that follows it
    items = body.get("input")
    if isinstance(items, str):
        return [*out, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise Refused("input", "'input' must be a string or a non-empty list of items.")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "reasoning":
            parts = [*(item.get("content") or []), *(item.get("summary") or [])]
            if not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in parts):
                raise Refused(where, f"'{where}': a reasoning item's content and summary are lists of text parts.")
            thought += "".join(p["text"] for p in parts)
            continue
        if kind == "message" and item.get("role") in ("user", "assistant", "system", "developer"):
            role = "system" if item["role"] == "developer" else item["role"]
            with_images = media.responses_content(item.get("content"), f"{where}.content") if role == "user" else None
            out.append({"role": role, "content": with_images or _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise Refused(where, f"'{where}': a function_call needs call_id, name and arguments strings.")
            call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls are one assistant turn
            elif last is not None and last["role"] == "assistant":
                last["tool_calls"] = [call]
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise Refused(f"{where}.call_id", f"'{where}.call_id' must be a string.")
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": _text(item.get("output"), f"{where}.output")})
        else:
            raise Refused(where, f"'{where}': item type {kind!r} is not supported (message, reasoning, function_call, "
                                 "function_call_output).")
        if thought:  # it belongs to this turn if an assistant's, else to none (not a later answer's)
            if out[-1]["role"] == "assistant":
                out[-1]["reasoning_content"] = thought
            thought = ""
    return out


def _tools(body: dict[str, Any], out: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise Refused("tools", "'tools' must be a list.")
        converted = []
        for i, tool in enumerate(tools):
            if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("name"), str)):
                kind = tool.get("type") if isinstance(tool, dict) else None
                raise Refused(f"tools[{i}]", f"'tools[{i}]': only function tools are supported (got {kind!r}).")
            function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
            converted.append({"type": "function", "function": function})
        out["tools"] = converted
    choice = body.get("tool_choice")
    if choice is not None:
        if choice in ("auto", "none", "required"):
            out["tool_choice"] = choice
        elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
            out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        else:
            raise Refused("tool_choice", "'tool_choice' must be auto, none, required or {\"type\": \"function\", \"name\": ...}.")
    if body.get("parallel_tool_calls") is not None:
        out["parallel_tool_calls"] = body["parallel_tool_calls"]


def _format(body: dict[str, Any], out: dict[str, Any]) -> None:
    text = body.get("text")
    if text is None:
        return
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
        raise Refused("text", "'text' may hold format (and verbosity).")
    if text.get("verbosity") not in (None, "medium"):
        raise Refused("text.verbosity", "'text.verbosity' is not supported.")
    fmt = text.get("format")
    if fmt is None or fmt == {"type": "text"}:
        return
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_object", "json_schema"):
        raise Refused("text.format", "'text.format.type' must be text, json_object or json_schema.")
    if fmt["type"] == "json_object":
        out["response_format"] = {"type": "json_object"}
    else:
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        out["response_format"] = {"type": "json_schema", "json_schema": schema}


def to_openai(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses request as an OpenAI chat request body; raise Refused."""
    _refuse_set(body)
    out: dict[str, Any] = {"messages": _messages(body)}
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_obfuscation"}
                                    and options.get("include_obfuscation") in (None, False)):
        raise Refused("stream_options", "'stream_options' may only set include_obfuscation to false: ggufrun's "
                                        "streams carry no obfuscation padding.")
    # Labels the chat parser checks (types) and otherwise only echoes: user, safety_identifier, prompt_cache_key.
    for key in ("model", "temperature", "top_p", "stream", "user", "safety_identifier", "prompt_cache_key", *EXTRAS):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    if body.get("top_logprobs") or "message.output_text.logprobs" in (body.get("include") or []):
        out["logprobs"], out["top_logprobs"] = True, body.get("top_logprobs") or 0
    _tools(body, out)
    _format(body, out)
    effort = (body.get("reasoning") or {}).get("effort")
    if effort is not None:
        out["reasoning_effort"] = effort
    require(out, NAMES)
    return streamed(out)


class _Builder:
    """The Response object as it grows: the same fields in created, completed and the whole reply."""

    def __init__(self, body: dict[str, Any], model: str) -> None:
        self.body, self.model = body, model
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.output: list[dict[str, Any]] = []
        self.seq = 0

    def response(self, status: str, usage: dict[str, Any] | None = None, finish: str | None = None,
                 error: dict[str, Any] | None = None) -> dict[str, Any]:
        body = self.body
        text = body.get("text") or {"format": {"type": "text"}}
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "error": error, "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "model": self.model, "output": list(self.output), "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": None, "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None},
            "store": False,
            "temperature": body.get("temperature"), "text": text, "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [], "top_p": body.get("top_p"), "truncation": "disabled",
            "usage": _usage(usage) if usage is not None else None, "user": body.get("user"), "metadata": body.get("metadata") or {},
        }

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse(kind, data)


def _usage(usage: dict[str, Any]) -> dict[str, Any]:
    return {"input_tokens": usage.get("prompt_tokens", 0), "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage.get("completion_tokens", 0),
            "output_tokens_details": {"reasoning_tokens": (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)},
            "total_tokens": usage.get("total_tokens", 0)}


def _message_item(text: str, status: str = "completed", logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}]}


def _reasoning_item(text: str, status: str = "completed") -> dict[str, Any]:
    """A model's thinking, whole, as the Responses API returns raw reasoning (gpt-oss's reasoning_text)."""
    return {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}] if text else []}


def _logprobs(choice: dict[str, Any]) -> list[dict[str, Any]]:
    """OpenAI chat logprobs content entries, which the Responses API carries as they are."""
    return list((choice.get("logprobs") or {}).get("content") or [])


def _was_cut(item: dict[str, Any]) -> bool:
    """Whether the last item of a reply that hit max_output_tokens is cut: text or thinking is; a
    function call is when its arguments are not whole JSON (the cut came after a call was written whole)."""
    if item["type"] != "function_call":
        return True
    try:
        json.loads(item["arguments"])
        return False
    except ValueError:
        return True


def _call_item(call: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"].get("arguments") or "", "status": "completed"}


def from_openai(result: dict[str, Any], builder: _Builder) -> dict[str, Any]:
    choice = result["choices"][0]
    message = choice["message"]
    if message.get("reasoning_content"):
        builder.output.append(_reasoning_item(message["reasoning_content"]))
    if message.get("content") or not message.get("tool_calls"):
        builder.output.append(_message_item(message.get("content") or "", logprobs=_logprobs(choice)))
    builder.output.extend(_call_item(call) for call in message.get("tool_calls") or [])
    status = "incomplete" if choice["finish_reason"] == "length" else "completed"
    if status == "incomplete" and _was_cut(builder.output[-1]):
        builder.output[-1]["status"] = "incomplete"  # the item being written when max_output_tokens cut it
    return builder.response(status, result.get("usage"), choice["finish_reason"])


async def events(run: ChatRun, b: _Builder) -> AsyncIterator[bytes]:
    """The Responses event stream from the OpenAI chunks of ``run``."""
    yield b.event("response.created", response=b.response("in_progress"))
    yield b.event("response.in_progress", response=b.response("in_progress"))
    text: list[str] = []
    logprobs: list[dict[str, Any]] = []
    message: dict[str, Any] | None = None  # the open message item
    calls: dict[int, dict[str, Any]] = {}  # OpenAI tool-call index -> function_call item
    finish = "stop"
    thinking: dict[str, Any] | None = None  # the open reasoning item
    thought: list[str] = []

    def closing_status(item: dict[str, Any], final: bool) -> str:
        """An item's status as it closes: "incomplete" for the one max_output_tokens cut (the last)."""
        return "incomplete" if final and finish == "length" and item is b.output[-1] and _was_cut(item) else "completed"

    def close_reasoning(final: bool = False) -> list[bytes]:
        nonlocal thinking
        if thinking is None:
            return []
        index = b.output.index(thinking)
        whole = "".join(thought)
        thinking.update(status=closing_status(thinking, final), content=[{"type": "reasoning_text", "text": whole}])
        out = [b.event("response.reasoning_text.done", item_id=thinking["id"], output_index=index, content_index=0, text=whole),
               b.event("response.output_item.done", output_index=index, item=thinking)]
        thinking = None
        return out

    def close_message(final: bool = False) -> list[bytes]:
        nonlocal message, logprobs
        if message is None:
            return []
        index = b.output.index(message)
        whole = "".join(text)
        part = {"type": "output_text", "text": whole, "annotations": [], "logprobs": logprobs}
        message.update(status=closing_status(message, final), content=[part])
        out = [b.event("response.output_text.done", item_id=message["id"], output_index=index, content_index=0, text=whole,
                       logprobs=logprobs),
               b.event("response.content_part.done", item_id=message["id"], output_index=index, content_index=0, part=part),
               b.event("response.output_item.done", output_index=index, item=message)]
        message, logprobs = None, []  # a later message (text after a tool call) starts empty
        text.clear()
        return out

    async for chunk in run.chunks():
        error = chunk_error(chunk)
        if error is not None:
            status, kind, detail = error
            yield b.event("error", code=kind, message=detail, param=None)
            yield b.event("response.failed", response=b.response("failed", error={"code": kind, "message": detail}))
            return
        choice = choice_of(chunk)
        if choice is None:  # the last chunk: usage only
            for out in [*close_reasoning(final=True), *close_message(final=True)]:
                yield out
            for call_item in calls.values():
                index = b.output.index(call_item)
                call_item["status"] = closing_status(call_item, True)
                yield b.event("response.function_call_arguments.done", item_id=call_item["id"], output_index=index,
                              arguments=call_item["arguments"], name=call_item["name"])
                yield b.event("response.output_item.done", output_index=index, item=call_item)
            incomplete = finish == "length"
            yield b.event("response.incomplete" if incomplete else "response.completed",
                          response=b.response("incomplete" if incomplete else "completed", chunk.get("usage"), finish))
            return
        finish = choice.get("finish_reason") or finish
        delta = choice.get("delta") or {}
        piece_logprobs = _logprobs(choice)
        logprobs.extend(piece_logprobs)
        if delta.get("reasoning_content"):
            if thinking is None:
                thinking = _reasoning_item("", "in_progress")
                b.output.append(thinking)
                yield b.event("response.output_item.added", output_index=len(b.output) - 1, item=dict(thinking))
            thought.append(delta["reasoning_content"])
            yield b.event("response.reasoning_text.delta", item_id=thinking["id"], output_index=b.output.index(thinking),
                          content_index=0, delta=delta["reasoning_content"])
        if delta.get("content") or delta.get("tool_calls"):
            for out in close_reasoning():
                yield out
        if delta.get("content"):
            if message is None:
                message = _message_item("", "in_progress")
                message["content"] = []
                b.output.append(message)
                index = len(b.output) - 1
                yield b.event("response.output_item.added", output_index=index, item=message)
                yield b.event("response.content_part.added", item_id=message["id"], output_index=index, content_index=0,
                              part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            text.append(delta["content"])
            yield b.event("response.output_text.delta", item_id=message["id"], output_index=b.output.index(message),
                          content_index=0, delta=delta["content"], logprobs=piece_logprobs)
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            item = calls.get(call.get("index", 0))
            if item is None:
                for out in close_message():
                    yield out
                item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                        "name": function.get("name") or "", "arguments": "", "status": "in_progress"}
                calls[call.get("index", 0)] = item
                b.output.append(item)
                yield b.event("response.output_item.added", output_index=len(b.output) - 1, item=dict(item))
            if function.get("arguments"):
                item["arguments"] += function["arguments"]
                yield b.event("response.function_call_arguments.delta", item_id=item["id"], output_index=b.output.index(item),
                              delta=function["arguments"])


def routes(server: Server) -> list[Route]:
    """``POST /v1/responses``."""

    @guarded(_render_error, NAMES)
    async def create(request: Request) -> Response:
        body = await body_of(server, request)
        openai_body = to_openai(body)
        run = await start_chat(server, openai_body, "/v1/responses")
        builder = _Builder(body, body.get("model") or run.choices.model)
        if openai_body.get("stream"):
            return stream(run, events(run, builder), "text/event-stream; charset=utf-8")
        result = await run.whole(request)
        if result is None:
            return Response(status_code=499)
        return JSONResponse(from_openai(result, builder))

    return [Route("/v1/responses", create, methods=["POST"])]


