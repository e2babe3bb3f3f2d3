"""JSON schema -> GBNF through llama-cpp-python's converter (the same one llama-server's Python
twin uses), so that ggufrun writes no schema compiler of its own."""

from __future__ import annotations

import json
from typing import Any

from ..errors import GgufrunError


class SchemaError(GgufrunError):
    """A JSON schema the GBNF converter cannot turn into a grammar."""

    http_status = 400


def schema_to_gbnf(schema: dict[str, Any]) -> str:
    """The GBNF grammar whose strings are the JSON documents ``schema`` accepts; raise SchemaError."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise SchemaError("The JSON schema is nested too deeply to convert to a grammar.") from None
    except Exception as exc:  # noqa: BLE001 (the converter signals unsupported schemas with asserts and ValueErrors alike)
        raise SchemaError(f"The JSON schema cannot be converted to a grammar: {exc}.") from None
