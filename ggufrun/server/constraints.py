"""Structured output: OpenAI's ``response_format`` and llama.cpp's ``json_schema`` as GBNF grammars.

A schema is hostile until bounded: llama-cpp-python's converter writes ``maxLength: n`` as n nested
groups and an ``enum`` as one alternative per value, so every keyword that sizes the grammar has a
limit (SCHEMA_LIMITS, documented in the README), and every keyword the grammar cannot enforce is
refused by name rather than ignored. The conversion itself runs off the event loop (finish)."""

from __future__ import annotations

import re
from typing import Any

from .api_errors import ApiError, invalid
from .gbnf import check_gbnf

JSON_OBJECT: dict[str, Any] = {"type": "object"}

MAX_STRING_LENGTH = 1000  # minLength / maxLength (each extra character is one nested group)
MAX_ITEMS = 1000  # minItems / maxItems (each optional item beyond the minimum is one nested group)
MAX_ENUM = 1024  # enum values
MAX_PROPERTIES = 256  # properties of one object
MAX_SCHEMA_NODES = 4096  # sub-schemas in all
MAX_SCHEMA_DEPTH = 32  # sub-schemas nested
MAX_PATTERN = 1000  # characters in a pattern
MAX_PATTERN_SIZE = 10_000  # characters a pattern's repetitions can write out
SCHEMA_LIMITS = {"minLength/maxLength": MAX_STRING_LENGTH, "minItems/maxItems": MAX_ITEMS, "enum values": MAX_ENUM,
                 "properties per object": MAX_PROPERTIES, "sub-schemas": MAX_SCHEMA_NODES,
                 "nesting": MAX_SCHEMA_DEPTH, "pattern length": MAX_PATTERN}

# Keywords the grammar cannot enforce: refused by name (a reply could break them with a 200).
UNENFORCED = {
    "uniqueItems": "a grammar cannot keep array items distinct",
    "multipleOf": "a grammar cannot check divisibility",
    "not": "a grammar cannot exclude a sub-schema",
    "if": "conditional schemas are not converted", "then": "conditional schemas are not converted",
    "else": "conditional schemas are not converted",
    "patternProperties": "property-name patterns are not converted",
    "propertyNames": "property-name schemas are not converted",
    "minProperties": "property counts are not converted", "maxProperties": "property counts are not converted",
    "contains": "'contains' is not converted", "minContains": "'contains' is not converted",
    "maxContains": "'contains' is not converted",
    "dependentRequired": "dependencies are not converted", "dependentSchemas": "dependencies are not converted",
    "dependencies": "dependencies are not converted",
    "unevaluatedProperties": "'unevaluated*' is not converted", "unevaluatedItems": "'unevaluated*' is not converted",
}
FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_QUANT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


def check_schema(schema: Any, param: str) -> None:
    """Refuse (400 naming ``param`` and the keyword's path) a schema over SCHEMA_LIMITS or with a
    keyword the grammar would not enforce. Cheap: one walk, bounded by the body's size."""
    if not isinstance(schema, dict):
        raise invalid(param, "expected a JSON schema object.")
    count = [0]

    def walk(node: Any, where: str, depth: int) -> None:
        if isinstance(node, bool):
            return
        if not isinstance(node, dict):
            raise invalid(where, "expected a JSON schema object.")
        count[0] += 1
        if count[0] > MAX_SCHEMA_NODES:
            raise invalid(param, f"the schema has more than {MAX_SCHEMA_NODES} sub-schemas.")
        if depth > MAX_SCHEMA_DEPTH:
            raise invalid(where, f"the schema is nested more than {MAX_SCHEMA_DEPTH} levels deep.")
        for key, why in UNENFORCED.items():
            if key in node and not (key == "uniqueItems" and node[key] is False):
                raise invalid(f"{where}.{key}", f"not supported: {why}, so the reply could break it.")
        kind = node.get("type")
        kinds = set(kind) if isinstance(kind, list) else {kind}
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key in node and kinds != {"integer"}:
                raise invalid(f"{where}.{key}", "numeric bounds are enforced for \"type\": \"integer\" only "
                              "(a grammar cannot bound a decimal number).")
        for lo, hi, limit in (("minLength", "maxLength", MAX_STRING_LENGTH), ("minItems", "maxItems", MAX_ITEMS)):
            values = {}
            for key in (lo, hi):
                if key in node:
                    v = node[key]
                    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= limit:
                        raise invalid(f"{where}.{key}", f"expected an integer from 0 to {limit} (got {v!r}).")
                    values[key] = v
            if len(values) == 2 and values[lo] > values[hi]:
                raise invalid(f"{where}.{lo}", f"{lo} {values[lo]} is above {hi} {values[hi]}.")
        if "enum" in node:
            if not isinstance(node["enum"], list) or not node["enum"]:
                raise invalid(f"{where}.enum", "expected a non-empty list.")
            if len(node["enum"]) > MAX_ENUM:
                raise invalid(f"{where}.enum", f"at most {MAX_ENUM} values (got {len(node['enum'])}).")
        fmt = node.get("format")
        if fmt is not None and fmt not in FORMATS and kinds & {"string", None}:
            raise invalid(f"{where}.format", f"the grammar enforces only the formats {', '.join(sorted(FORMATS))} "
                          f"(got {fmt!r}).")
        if "pattern" in node:
            _check_pattern(node["pattern"], f"{where}.pattern")
        for key in _SUBSCHEMA_MAPS:
            sub = node.get(key)
            if sub is None:
                continue
            if not isinstance(sub, dict):
                raise invalid(f"{where}.{key}", "expected an object of schemas.")
            if key == "properties" and len(sub) > MAX_PROPERTIES:
                raise invalid(f"{where}.{key}", f"at most {MAX_PROPERTIES} properties (got {len(sub)}).")
            for name, s in sub.items():
                walk(s, f"{where}.{key}.{name}", depth + 1)
        for key in _SUBSCHEMA_LISTS:
            sub = node.get(key)
            if sub is None:
                continue
            if not isinstance(sub, list):
                raise invalid(f"{where}.{key}", "expected a list of schemas.")
            for i, s in enumerate(sub):
                walk(s, f"{where}.{key}[{i}]", depth + 1)
        items = node.get("items")
        if isinstance(items, list):
            for i, s in enumerate(items):
                walk(s, f"{where}.items[{i}]", depth + 1)
        elif items is not None:
            walk(items, f"{where}.items", depth + 1)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            walk(extra, f"{where}.additionalProperties", depth + 1)

    walk(schema, param, 0)


_HEX_ESCAPE = re.compile(r"\\(?:x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4}))")


def _check_pattern(pattern: Any, where: str) -> None:
    """A pattern's length, and the size its repetitions write out (``((a{999}){999}){999}`` is short)."""
    if not isinstance(pattern, str):
        raise invalid(where, "expected a regular expression string.")
    if len(pattern) > MAX_PATTERN:
        raise invalid(where, f"at most {MAX_PATTERN} characters (got {len(pattern)}).")
    # The converter writes a pattern's characters unescaped inside the JSON string: one that can
    # match '"', '\\' or a control character would make the reply invalid JSON.
    unsafe = '"' in pattern or "\\\\" in pattern or any(ord(c) < 0x20 for c in pattern)
    # \xNN and \uNNNN escapes reach llama.cpp's grammar as the characters they name ("\x22" is a quote)
    escaped = [int(m.group(1) or m.group(2), 16) for m in _HEX_ESCAPE.finditer(pattern)]
    unsafe = unsafe or any(c < 0x20 or c in (0x22, 0x5C) for c in escaped)
    for cls in re.findall(r"\[(?!\^)((?:[^\]\\]|\\.)*)\]", _HEX_ESCAPE.sub(lambda m: chr(int(m.group(1) or m.group(2), 16)), pattern)):
        for a, b in re.findall(r"(.)-(.)", cls):
            if any(ord(a) <= c <= ord(b) for c in (0x22, 0x5C)) or ord(a) < 0x20:
                unsafe = True
    if unsafe:
        raise invalid(where, "a pattern that can match '\"', '\\' or a control character is not supported "
                      "(the grammar writes the match unescaped in the JSON string).")
    stack: list[int] = []
    size, last, i = 0, 0, 0
    while i < len(pattern):
        c = pattern[i]
        m = _QUANT.match(pattern, i) if c == "{" else None
        if m:
            lo, hi = int(m.group(1)), m.group(2)
            top = max(lo, int(hi) if hi else lo)
            if hi and int(hi) < lo:
                raise invalid(where, f"the repetition {m.group(0)} has its minimum above its maximum.")
            size += last * (max(top, 1) - 1)
            last, i = 0, m.end()
        elif c == "(":
            stack.append(size)
            size, last, i = 0, 0, i + 1
        elif c == ")":
            inner = size
            size = (stack.pop() if stack else 0) + inner
            last, i = inner, i + 1
        else:
            step = 2 if c == "\\" else 1
            if c == "[":
                j = pattern.find("]", i + 1)
                step = (j - i + 1) if j > 0 else 1
            size += 1
            last, i = 1, i + step
        if size > MAX_PATTERN_SIZE:
            raise invalid(where, f"its repetitions write out more than {MAX_PATTERN_SIZE} characters.")


def schema_grammar(schema: Any, param: str) -> str:
    """GBNF for ``schema``, bounded and checked; a schema over the limits or one the converter
    cannot handle is a 400 naming ``param``. Slow for big schemas: call it off the event loop."""
    from ..llama.grammar import SchemaError, schema_to_gbnf

    check_schema(schema, param)
    try:
        gbnf = schema_to_gbnf(schema)
    except SchemaError as exc:
        raise ApiError(400, exc.message, param=param) from None
    check_gbnf(gbnf, param)
    return gbnf


def from_response_format(fmt: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(schema, the field that holds it) for a ``response_format`` object; the schema is checked
    here and converted by :func:`finish`."""
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None, "response_format"
    if kind == "json_object":
        return JSON_OBJECT, "response_format"
    if kind != "json_schema":
        raise invalid("response_format.type", f"expected 'text', 'json_object' or 'json_schema' (got {kind!r}).")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid("response_format.json_schema", "expected {name, schema, strict}.")
    name = spec.get("name")
    if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name)):
        raise invalid("response_format.json_schema.name", "expected 1 to 64 letters, digits, '_' or '-'.")
    schema = spec.get("schema", {"type": "object"})
    # strict or not, the grammar enforces the schema: a reply that would not validate cannot be sampled
    if spec.get("strict") not in (None, True, False):
        raise invalid("response_format.json_schema.strict", "expected true or false.")
    param = "response_format.json_schema.schema"
    check_schema(schema, param)
    return schema, param


def finish(grammar: str | None, schema: dict[str, Any] | None, param: str) -> str | None:
    """Off the event loop: a request's grammar, its schema's when it has one (conversion of a big
    schema takes a while); a user's GBNF checked before llama.cpp parses it."""
    if schema is not None and grammar is None:
        return schema_grammar(schema, param)
    if grammar is not None:
        check_gbnf(grammar, param)
    return grammar


def embed_rules(gbnf: str, prefix: str) -> tuple[str, str]:
    """The converter's rules renamed under ``prefix`` (so several grammars can share one file),
    and the name of what was its root rule."""
    names = set(re.findall(r"^([A-Za-z0-9-]+)\s*::=", gbnf, flags=re.MULTILINE))
    def rename(m: re.Match[str]) -> str:
        return f"{prefix}-{m.group(0)}" if m.group(0) in names else m.group(0)

    out = []
    for line in gbnf.splitlines():
        # rename identifiers outside string literals and character classes
        parts = re.split(r'("(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\])', line)
        out.append("".join(p if i % 2 else re.sub(r"[A-Za-z][A-Za-z0-9-]*", rename, p) for i, p in enumerate(parts)))
    return "\n".join(out), f"{prefix}-root"
