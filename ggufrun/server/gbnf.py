"""A GBNF grammar read by ggufrun before llama.cpp parses it, so that no request's grammar can
crash or exhaust the server.

llama.cpp trusts its grammar text: its parser recurses once per nested group (100,000 nested
groups, what a ``maxLength: 100000`` schema converts to, overflow the stack: a segfault), and it
expands ``x{m,n}`` into ``n - m`` rules counted in unsigned arithmetic (``{5,2}`` asks for 2^64 of
them: memory without limit). This scanner reads the text as llama.cpp's parser does (comments,
string literals, character classes, token references, groups, repetitions) without recursion and
refuses, each with a 400 naming the field, a grammar that is too big, nested too deep, repeats
out of bounds or too much in all, or references a rule it does not define. What it does not
check (the finer syntax) llama.cpp still rejects itself, with a 400.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .api_errors import ApiError

MAX_BYTES = 256 * 1024  # grammar text; a JSON schema's grammar within the schema limits is well under it
MAX_RULES = 4096  # rules defined
MAX_DEPTH = 1000  # nested groups: llama.cpp's parser recurses per level (one worker thread's stack holds 1000)
MAX_REPEAT = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD: above it, {m,n} silently becomes {m,}
MAX_EXPANDED = 300_000  # grammar elements once every repetition is written out (each byte of text counts as one, so above MAX_BYTES)

_NAME = re.compile(r"[A-Za-z0-9-]+")
_SPACE = re.compile(r"[ \t]*(?:#[^\r\n]*)?")
_REPEAT = re.compile(r"\{\s*(\d{1,9})\s*(?:(,)\s*(\d{1,9})?\s*)?\}")
_TOKEN = re.compile(r"!?<(?:\[\d{1,9}\]|[^<>\s]{1,64})>")


@dataclass
class GrammarShape:
    """What the scan found: the rules, the token ids referenced (checked against the vocabulary
    by the caller, who knows it) and the size once repetitions are expanded."""

    rules: set[str] = field(default_factory=set)
    token_ids: set[int] = field(default_factory=set)
    expanded: int = 0
    depth: int = 0


def _refuse(param: str, what: str) -> ApiError:
    return ApiError(400, f"Invalid '{param}': {what}", param=param)


def check_gbnf(text: str, param: str = "grammar") -> GrammarShape:
    """Scan GBNF ``text``; raise ApiError (400 naming ``param``) for a grammar llama.cpp must not see."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise _refuse(param, f"the grammar is {size} bytes; at most {MAX_BYTES} are accepted.")
    if "\x00" in text:
        raise _refuse(param, "the grammar contains a NUL character (llama.cpp would stop reading there).")
    shape = GrammarShape()
    referenced: dict[str, int] = {}
    depth = 0
    last = 0  # elements in the item before the cursor (0: none, so a repetition has nothing to repeat)
    at_head = True  # the cursor may be at the start of a rule definition
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t":
            i = _SPACE.match(text, i).end()  # type: ignore[union-attr]
            continue
        if c == "#":
            i = _SPACE.match(text, i).end()  # type: ignore[union-attr]
            continue
        if c in "\r\n":
            i += 1
            if depth == 0:
                at_head, last = True, 0
            continue
        if c == '"' or c == "[":
            close = '"' if c == '"' else "]"
            j, chars = i + 1, 0
            while j < n and text[j] != close:
                if text[j] in "\r\n" and c == '"':
                    break
                j += 2 if text[j] == "\\" else 1
                chars += 1
            if j >= n or text[j] != close:
                what = "string literal" if c == '"' else "character class"
                raise _refuse(param, f"unterminated {what} at offset {i}.")
            i, at_head = j + 1, False
            last = max(chars, 1) if c == '"' else 1  # llama.cpp repeats a literal's every character
            continue
        if c == "(":
            depth += 1
            shape.depth = max(shape.depth, depth)
            if depth > MAX_DEPTH:
                raise _refuse(param, f"groups are nested more than {MAX_DEPTH} deep.")
            i, last, at_head = i + 1, 0, False
            continue
        if c == ")":
            if depth == 0:
                raise _refuse(param, f"unbalanced ')' at offset {i}.")
            depth -= 1
            i, last = i + 1, 1  # a group is one rule reference
            continue
        if c == "|":
            i, last = i + 1, 0
            continue
        if c == ".":
            i, last, at_head = i + 1, 1, False
            continue
        if c in "*+?":
            if not last:
                raise _refuse(param, f"'{c}' at offset {i} has nothing before it to repeat.")
            shape.expanded += last * 2
            i, last = i + 1, 1
            continue
        if c == "{":
            m = _REPEAT.match(text, i)
            if m is None:
                raise _refuse(param, f"a repetition at offset {i} must be {{m}}, {{m,}} or {{m,n}} with numbers of at most 9 digits.")
            if not last:
                raise _refuse(param, f"the repetition {m.group(0)} at offset {i} has nothing before it to repeat.")
            lo = int(m.group(1))
            hi = lo if m.group(2) is None else (int(m.group(3)) if m.group(3) is not None else None)
            if hi is not None and hi < lo:
                raise _refuse(param, f"the repetition {m.group(0)} has its minimum above its maximum.")
            if max(lo, hi or 0) > MAX_REPEAT:
                raise _refuse(param, f"the repetition {m.group(0)} exceeds {MAX_REPEAT}, llama.cpp's limit.")
            shape.expanded += last * max(lo, hi or 0, 1) + max((hi or lo + 1) - lo, 0)
            i, last = m.end(), 1
            continue
        if c == "<" or (c == "!" and text.startswith("<", i + 1)):
            m = _TOKEN.match(text, i)
            if m is None:
                raise _refuse(param, f"a token reference at offset {i} must be <[id]> or <token>.")
            ids = re.fullmatch(r"!?<\[(\d+)\]>", m.group(0))
            if ids:
                shape.token_ids.add(int(ids.group(1)))
            i, last, at_head = m.end(), 1, False
            continue
        m = _NAME.match(text, i)
        if m is None:
            raise _refuse(param, f"unexpected character {c!r} at offset {i}.")
        name, j = m.group(0), m.end()
        rest = _SPACE.match(text, j).end()  # type: ignore[union-attr]
        if text.startswith("::=", rest):
            if not at_head or depth:
                raise _refuse(param, f"the rule '{name}' is defined inside another rule (offset {i}).")
            shape.rules.add(name)
            if len(shape.rules) > MAX_RULES:
                raise _refuse(param, f"more than {MAX_RULES} rules.")
            i, last, at_head = rest + 3, 0, False
            continue
        referenced.setdefault(name, i)
        i, last, at_head = j, 1, False
    if depth:
        raise _refuse(param, "a '(' is never closed.")
    shape.expanded += size
    if shape.expanded > MAX_EXPANDED:
        raise _refuse(param, f"the grammar expands to more than {MAX_EXPANDED} elements once its repetitions are "
                      "written out; lower the repetition counts.")
    if "root" not in shape.rules:
        raise _refuse(param, "the grammar has no 'root' rule.")
    undefined = sorted(set(referenced) - shape.rules, key=referenced.__getitem__)
    if undefined:
        raise _refuse(param, f"the rule '{undefined[0]}' is used but never defined.")
    return shape
