"""Tool calling: tools into the prompt, ``tool_choice`` as a grammar, the reply parsed into calls.

Three prompt formats, chosen from the model's template:

- ``qwen`` (Hermes/Qwen2.5, ChatML): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
- ``llama3`` (Llama 3.1's JSON tool calling): ``{"name": ..., "parameters": {...}}``;
- ``generic``, for templates that know nothing of tools: ``{"tool_calls": [{"name": ..., "arguments": {...}}]}``.

A GGUF Jinja template that mentions ``tools`` renders them itself (``native``); other templates get
the format's instructions in the system message, and past calls and results rewritten as text.
``tool_choice`` ``required`` or a named function becomes a GBNF grammar that admits only calls to
the allowed functions with arguments valid for their schemas, so that any model produces one.
``auto`` becomes the same grammar made lazy (llama.cpp's trigger patterns, as llama-server does):
the reply is free until it starts a call (``<tool_call>``, or a reply that opens with the format's
JSON call), and from there the call is constrained.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .constraints import check_schema, embed_rules, schema_grammar
from .protocol import ApiError, invalid

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*')
# a "}" followed only by what may begin the end of the call: space, then part of "</tool_call>"
_TAIL = re.compile(r"\}\s*(?:<(?:/(?:t(?:o(?:o(?:l(?:_(?:c(?:a(?:l(?:l(?:>)?)?)?)?)?)?)?)?)?)?)?)?")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass
class ToolPlan:
    """What a request's tools do to the prompt, the sampling and the reply."""

    tools: list[dict[str, Any]]  # OpenAI's {"type": "function", "function": {...}} objects
    choice: str  # "none" | "auto" | "required" | "function" (then ``forced`` names it)
    parallel: bool = True
    forced: str | None = None
    fmt: str = "generic"  # "qwen" | "llama3" | "generic"
    native: bool = False  # the GGUF template renders tools itself

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"


def parse_tools(body: dict[str, Any]) -> ToolPlan | None:
    """The request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``, validated; None without tools."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid("parallel_tool_calls", "expected true or false.")
    if tools is None:
        if choice not in (None, "none"):
            raise invalid("tool_choice", "needs 'tools'.")
        return None
    if not isinstance(tools, list) or len(tools) > 128:
        raise invalid("tools", "expected a list of up to 128 function tools.")
    seen = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise invalid(f"tools[{i}]", 'expected {"type": "function", "function": {"name", "description", "parameters"}}.')
        for key in tool:
            if key not in ("type", "function"):
                raise invalid(f"tools[{i}].{key}", "not a field of a function tool.")
        for key in fn:
            if key not in ("name", "description", "parameters", "strict"):
                raise invalid(f"tools[{i}].function.{key}", "not a field of a function definition.")
        name = fn.get("name")
        if not (isinstance(name, str) and _NAME.fullmatch(name)):
            raise invalid(f"tools[{i}].function.name", "expected 1 to 64 letters, digits, '_' or '-'.")
        if name in seen:
            raise invalid(f"tools[{i}].function.name", f"two tools are named '{name}'.")
        seen.add(name)
        if not isinstance(fn.get("description", ""), str):
            raise invalid(f"tools[{i}].function.description", "expected a string.")
        if not isinstance(fn.get("parameters", {}), dict):
            raise invalid(f"tools[{i}].function.parameters", "expected a JSON schema object.")
        if fn.get("strict") not in (None, True, False):
            raise invalid(f"tools[{i}].function.strict", "expected true or false.")
    forced = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid("tool_choice", 'expected "none", "auto", "required" or {"type": "function", "function": {"name": ...}}.')
        if fn["name"] not in seen:
            raise invalid("tool_choice", f"names '{fn['name']}', which is not among the tools.")
        forced, choice = fn["name"], "function"
    elif choice is None:
        choice = "auto" if tools else "none"
    elif choice not in ("none", "auto", "required"):
        raise invalid("tool_choice", 'expected "none", "auto", "required" or {"type": "function", "function": {"name": ...}}.')
    if choice in ("required",) and not tools:
        raise invalid("tool_choice", "'required' needs at least one tool.")
    return ToolPlan(tools=tools, choice=choice, parallel=parallel is not False, forced=forced)


def choose_format(plan: ToolPlan | None, template: Any) -> ToolPlan | None:
    """Fill in the plan's format from the model's chat template (a templates.ChatTemplate)."""
    if plan is None:
        return None
    source = template.jinja_source or ""
    if source:
        plan.native = "tools" in source
        plan.fmt = "qwen" if OPEN in source else "llama3" if "<|python_tag|>" in source or "<|eom_id|>" in source else "generic"
    else:
        plan.fmt = {"chatml": "qwen", "llama3": "llama3"}.get(template.name, "generic")
    return plan


# ---- the prompt ----------------------------------------------------------------------------------

def _signatures(plan: ToolPlan) -> str:
    return "\n".join(json.dumps(t, ensure_ascii=False) for t in plan.tools)


def _instructions(plan: ToolPlan) -> str:
    if plan.fmt == "qwen":  # Qwen2.5's own wording
        return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
                f"{_signatures(plan)}\n</tools>\n\n"
                "For each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    if plan.fmt == "llama3":  # Llama 3.1's JSON tool-calling prompt
        return ("You have access to the following functions. To call a function, respond with JSON for a function call "
                'only, in the format {"name": function name, "parameters": dictionary of argument name and its value}. '
                "Do not use variables.\n\n" + _signatures(plan))
    return ("You can call the following tools:\n" + _signatures(plan) + "\n\nTo call tools, reply with only a JSON object "
            'of the form {"tool_calls": [{"name": <tool name>, "arguments": <arguments object>}]}. '
            "Otherwise, reply normally.")


def _call_text(plan: ToolPlan, calls: list[dict[str, Any]]) -> str:
    items = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]
    if plan.fmt == "qwen":
        return "\n".join(f"{OPEN}\n{json.dumps(i, ensure_ascii=False)}\n{CLOSE}" for i in items)
    if plan.fmt == "llama3":
        return "\n".join(json.dumps({"name": i["name"], "parameters": i["arguments"]}, ensure_ascii=False) for i in items)
    return json.dumps({"tool_calls": items}, ensure_ascii=False)


def prepare_messages(plan: ToolPlan | None, messages: list[dict[str, Any]], template: Any) -> tuple[list[dict[str, Any]], Any]:
    """(messages, tools) to render: a native template gets both as they are; any other gets the
    tools described in the system message and past calls and results written out as text."""
    native = plan.native if plan is not None else bool(template.jinja_source and "tools" in template.jinja_source)
    if native:
        return messages, plan.tools if plan is not None and plan.active else None
    fmt_plan = plan or choose_format(ToolPlan(tools=[], choice="none"), template)
    assert fmt_plan is not None
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.get("tool_calls"):
            text = (m["content"] + "\n" if m["content"] else "") + _call_text(fmt_plan, m["tool_calls"])
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            result = f"<tool_response>\n{m['content']}\n</tool_response>" if fmt_plan.fmt == "qwen" else \
                f"Result of tool call {m['tool_call_id']}:\n{m['content']}"
            out.append({"role": "user", "content": result})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content", "reasoning_content")})
    if plan is not None and plan.active:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{_instructions(plan)}"}
        else:
            out.insert(0, {"role": "system", "content": _instructions(plan)})
    return out, None


# ---- constrained decoding ------------------------------------------------------------------------

def grammar(plan: ToolPlan | None) -> str | None:
    """GBNF that admits only calls to the allowed tools (tool_choice required or named); else None."""
    if plan is None or plan.choice not in ("required", "function"):
        return None
    return _calls_grammar(plan)


# Where a call starts in a reply, per format: a llama.cpp trigger pattern (searched for anywhere, or,
# written ^...$, matched against the whole reply so far); the grammar applies from the pattern's
# first group, else from where it matched.
TRIGGERS = {
    "qwen": OPEN,
    "llama3": r'^\s*(?:<\|python_tag\|>)?\s*(\{\s*"name"[\s\S]*)$',
    "generic": r'^\s*(\{\s*"tool_calls"[\s\S]*)$',
}


def lazy_grammar(plan: ToolPlan | None) -> tuple[str, list[str]] | None:
    """(GBNF, trigger patterns) for tool_choice auto: the calls' grammar, applied once the reply
    starts a call; None when there are no tools to call."""
    if plan is None or plan.choice != "auto" or not plan.tools:
        return None
    try:
        return _calls_grammar(plan), [TRIGGERS[plan.fmt]]
    except ApiError:
        # A schema the converter cannot turn into GBNF (an unanchored "pattern", say): auto never
        # promised a grammar, so the reply runs unconstrained rather than the request failing.
        return None


def _calls_grammar(plan: ToolPlan) -> str:
    key = "parameters" if plan.fmt == "llama3" else "arguments"
    for i, t in enumerate(plan.tools):  # each schema's limits, named where the client wrote it
        check_schema(t["function"].get("parameters") or {"type": "object"}, f"tools[{i}].function.parameters")
    tools = [t for t in plan.tools if plan.forced in (None, t["function"]["name"])]
    items = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               key: t["function"].get("parameters") or {"type": "object"}},
              "required": ["name", key], "additionalProperties": False} for t in tools]
    call = items[0] if len(items) == 1 else {"anyOf": items}
    if plan.fmt == "generic":
        array = {"type": "array", "items": call, "minItems": 1, **({} if plan.parallel else {"maxItems": 1})}
        return schema_grammar({"type": "object", "properties": {"tool_calls": array}, "required": ["tool_calls"],
                               "additionalProperties": False}, "tools")
    rules, root = embed_rules(schema_grammar(call, "tools"), "tc")
    if plan.fmt == "qwen":
        one = f'"{OPEN}\\n" {root} "\\n{CLOSE}"'
        body = f'{one} ("\\n" {one})*' if plan.parallel else one
    else:
        body = f'{root} ("\\n" {root})*' if plan.parallel else root
    return f"root ::= {body}\n{rules}\n"


# ---- the reply -----------------------------------------------------------------------------------

def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _as_call(obj: Any) -> dict[str, Any] | None:
    """{"name", "arguments"|"parameters"} as an OpenAI tool call; None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": new_call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def _json_calls(text: str) -> list[dict[str, Any]] | None:
    """Calls in a reply that is only JSON: generic, llama3 (one object per line) or a bare object."""
    text = text.strip().removeprefix("<|python_tag|>").strip()
    try:
        objs = [json.loads(text)]
    except ValueError:
        try:
            objs = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            return None
    if len(objs) == 1 and isinstance(objs[0], dict) and isinstance(objs[0].get("tool_calls"), list):
        objs = objs[0]["tool_calls"]
    calls = [_as_call(o) for o in objs]
    return calls if calls and all(c is not None for c in calls) else None  # type: ignore[return-value]


@dataclass
class ToolStream:
    """Splits a reply, as it streams, into content text and complete tool calls.

    Text that may begin a call (``<tool_call>``, or a reply that opens with ``{`` in the JSON
    formats) is held until the call is complete, then given as one call; anything that turns out
    not to be a call is given back as content. With ``incremental``, a tagged call that opens with
    ``{"name": ..., "arguments":`` (the order the grammar forces) is given as it grows instead:
    ``("call_start", call)``, then ``("args", fragment)``s that join to its arguments' JSON."""

    plan: ToolPlan
    incremental: bool = False
    buffer: str = ""
    in_tag: bool = False
    json_mode: bool | None = None  # None until the reply's first non-space character decides
    calls: list[dict[str, Any]] = field(default_factory=list)
    growing: dict[str, Any] | None = None  # the call whose arguments are streaming
    args_at: int = 0  # where its arguments start in the buffer
    args_sent: int = 0  # how many of their characters were given out
    whole_call: bool = False  # the tagged call being read is not streamed (its arguments are not an object)

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self.buffer += text
        out: list[tuple[str, Any]] = []
        if self.json_mode is None:
            head = self.buffer.lstrip()
            if not head:
                return out
            tag = "<|python_tag|>"
            if self.plan.fmt != "qwen" and len(head) < len(tag) and tag.startswith(head):
                return out  # may still become a python tag
            self.json_mode = self.plan.fmt != "qwen" and head.startswith(("{", tag))
        if self.json_mode:
            return out  # decided at the end
        while True:
            if self.in_tag and self.incremental and self._grow(out):
                continue
            if self.in_tag:
                end = self.buffer.find(CLOSE)
                if end < 0:
                    return out
                self._call(self.buffer[:end], out, OPEN + self.buffer[: end + len(CLOSE)])
                self.buffer, self.in_tag = self.buffer[end + len(CLOSE):], False
                continue
            start = self.buffer.find(OPEN)
            if start >= 0:
                if self.buffer[:start].strip():
                    out.append(("content", self.buffer[:start].rstrip("\n")))
                self.buffer, self.in_tag = self.buffer[start + len(OPEN):], True
                continue
            hold = next((k for k in range(min(len(OPEN) - 1, len(self.buffer)), 0, -1) if self.buffer.endswith(OPEN[:k])), 0)
            safe = self.buffer[: len(self.buffer) - hold]
            if safe and (not self.calls or safe.strip()):
                out.append(("content", safe))
            self.buffer = self.buffer[len(safe):]
            return out

    def _grow(self, out: list[tuple[str, Any]]) -> bool:
        """Stream the arguments of the tagged call being written; True when that call just ended."""
        if self.growing is None:
            if self.whole_call:
                return False
            m = _HEAD.match(self.buffer)
            if m is None or m.group(1) not in self.plan.names or (self.calls and not self.plan.parallel):
                return False
            if m.end() == len(self.buffer):
                return False  # wait for the arguments' first character
            if self.buffer[m.end()] != "{":
                # Arguments written as a JSON string (or anything but an object) are read whole and given
                # as one call, re-serialised; streamed raw, they would not be an object's JSON.
                self.whole_call = True
                return False
            self.growing = {"id": new_call_id(), "type": "function", "function": {"name": m.group(1), "arguments": ""}}
            self.args_at, self.args_sent = m.end(), 0
            out.append(("call_start", self.growing))
        end = self.buffer.find(CLOSE)
        body = self.buffer[self.args_at:] if end < 0 else self.buffer[self.args_at:end]
        if end >= 0:
            ready = body.rstrip()
            ready = ready.removesuffix("}")  # the call object's own closing brace
        else:
            # hold back a last "}" that may close the call object rather than the arguments
            cut = body.rfind("}")
            ready = body[:cut] if cut >= 0 and _TAIL.fullmatch(body[cut:]) else body
        if len(ready) > self.args_sent:
            out.append(("args", ready[self.args_sent:]))
            self.args_sent = len(ready)
        if end < 0:
            return False
        # exactly the text streamed, so that the fragments joined equal a whole reply's arguments
        self.growing["function"]["arguments"] = ready[: self.args_sent]
        self.calls.append(self.growing)
        self.growing = None
        self.buffer, self.in_tag = self.buffer[end + len(CLOSE):], False
        return True

    def finish(self, cut: bool = False) -> list[tuple[str, Any]]:
        """The rest of the reply; ``cut``: generation stopped at max_tokens (finish_reason "length").

        A call cut short never leaves its markup in the content. As OpenAI does, the calls written
        whole are kept and the cut one is kept too with its arguments as far as they got (the stream
        already sent them; finish_reason "length" says they are incomplete), where its arguments had
        begun; cut before that, it is dropped."""
        out: list[tuple[str, Any]] = []
        if self.growing is not None:  # cut short: what was sent stays sent
            self.growing["function"]["arguments"] = self.buffer[self.args_at:][: self.args_sent]
            self.calls.append(self.growing)
            self.growing, self.buffer, self.in_tag = None, "", False
            return out
        if self.json_mode:
            calls = _json_calls(self.buffer)
            if calls is None and cut and self.plan.choice in ("required", "function"):
                calls = _complete_json_calls(self.buffer)  # the grammar forced calls: never content
            if calls is None:
                out.append(("content", self.buffer))
            else:
                for call in calls:
                    self._add(call, out)
        elif self.in_tag:  # a call cut short (max_tokens): keep it if its JSON is whole
            # dropped when cut where a call's JSON was beginning; a tag followed by anything else
            # (an unconstrained reply's text) is given back as it was
            began = cut and self.buffer.lstrip()[:1] in ("", "{")
            self._call(self.buffer, out, "" if began else OPEN + self.buffer)
        elif self.buffer:
            out.append(("content", self.buffer))
        self.buffer = ""
        return out

    def _call(self, raw: str, out: list[tuple[str, Any]], original: str) -> None:
        self.whole_call = False
        try:
            call = _as_call(json.loads(raw))
        except ValueError:
            call = None
        if call is None:
            if original:
                out.append(("content", original))
        else:
            self._add(call, out)

    def _add(self, call: dict[str, Any], out: list[tuple[str, Any]]) -> None:
        if call["function"]["name"] not in self.plan.names:
            out.append(("content", _call_text(self.plan, [{"function": {"name": call["function"]["name"],
                                                                         "arguments": json.loads(call["function"]["arguments"])}}])))
            return
        if self.calls and not self.plan.parallel:
            return  # parallel_tool_calls: false keeps the first call only
        self.calls.append(call)
        out.append(("call", call))


def _complete_json_calls(text: str) -> list[dict[str, Any]]:
    """The calls written whole in a JSON-format reply cut short: the generic format's array items, or
    llama3's objects one a line, before the one that was cut."""
    text = text.strip().removeprefix("<|python_tag|>").strip()
    decoder = json.JSONDecoder()
    m = re.match(r'\{\s*"tool_calls"\s*:\s*\[\s*', text)
    pos, calls = (m.end() if m else 0), []
    while pos < len(text):
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except ValueError:
            break
        call = _as_call(obj)
        if call is None:
            break
        calls.append(call)
        pos = re.compile(r"\s*,?\s*").match(text, pos).end()  # type: ignore[union-attr]
    return calls


def parse_reply(plan: ToolPlan, text: str, cut: bool = False) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) of a whole reply, read as the stream reads it (the same argument text);
    ``cut``: it ended at max_tokens."""
    stream = ToolStream(plan, incremental=True)
    parts = [*stream.feed(text), *stream.finish(cut)]
    content = "".join(p for kind, p in parts if kind == "content")
    return (content.strip() or None) if stream.calls else content, stream.calls
