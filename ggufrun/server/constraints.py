"""Structured output: OpenAI's ``response_format`` and llama.cpp's ``json_schema`` as GBNF grammars."""

from __future__ import annotations

import re
from typing import Any

from .api_errors import ApiError, invalid

JSON_OBJECT: dict[str, Any] = {"type": "object"}


def schema_grammar(schema: Any, param: str) -> str:
    """GBNF for ``schema``; a schema the converter cannot handle is a 400 naming ``param``."""
    from ..llama.grammar import SchemaError, schema_to_gbnf

    if not isinstance(schema, dict):
        raise invalid(param, "expected a JSON schema object.")
    try:
        return schema_to_gbnf(schema)
    except SchemaError as exc:
        raise ApiError(400, exc.message, param=param) from None


def from_response_format(fmt: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """(grammar, schema) for a ``response_format`` object."""
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None, None
    if kind == "json_object":
        return schema_grammar(JSON_OBJECT, "response_format"), JSON_OBJECT
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
    return schema_grammar(schema, "response_format.json_schema.schema"), schema


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
