"""JSON schema -> GBNF through llama-cpp-python's converter (the same one llama-server's Python
twin uses), so that ggufrun writes no schema compiler of its own. Two gaps of that converter
(llama-cpp-python 0.3.x) are closed here, as llama.cpp's own C++ converter closes them: JSON
strings hold no raw control characters, and integer ``minimum``/``maximum`` become a grammar."""

from __future__ import annotations

import json
import math
from typing import Any

from ..errors import GgufrunError

# llama.cpp's char rule (common/json-schema-to-grammar.cpp): raw control characters and DEL must
# be escaped in JSON, so the grammar never samples them inside a string.
CHAR_RULE = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
JSON_UNSAFE = r'"\\\x7F\x00-\x1F'  # what a JSON string cannot hold unescaped
JSON_DOT = r'[^\x0A\x0D]'  # the converter's "." (narrowed with JSON_UNSAFE)
INT_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_I64 = (-(1 << 63), (1 << 63) - 1)


class SchemaError(GgufrunError):
    """A JSON schema the GBNF converter cannot turn into a grammar."""

    http_status = 400


def schema_to_gbnf(schema: dict[str, Any]) -> str:
    """The GBNF grammar whose strings are the JSON documents ``schema`` accepts; raise SchemaError."""
    try:
        converter = _converter()
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "stdin")
        converter.visit(resolved, "")
        return str(converter.format_grammar())
    except SchemaError:
        raise
    except RecursionError:
        raise SchemaError("The JSON schema is nested too deeply to convert to a grammar.") from None
    except Exception as exc:  # noqa: BLE001 (the converter signals unsupported schemas with asserts and ValueErrors alike)
        raise SchemaError(f"The JSON schema cannot be converted to a grammar: {exc}.") from None


def _converter() -> Any:
    from llama_cpp import llama_grammar as lg

    class Converter(lg.SchemaConverter):  # type: ignore[misc,name-defined]
        def _add_primitive(self, name: str, rule: Any) -> Any:
            if name == "char":
                rule = lg.BuiltinRule(CHAR_RULE, [])
            return super()._add_primitive(name, rule)

        def _visit_pattern(self, pattern: str, name: str) -> Any:
            # The converter writes a pattern's characters unescaped between the JSON quotes: "." and
            # [^...] would let '"', '\\' and control characters in (invalid JSON); they are narrowed
            # to what JSON holds unescaped. (constraints.check_schema refuses literal ones.)
            before = set(self._rules)
            out = super()._visit_pattern(gbnf_escapes(pattern), name)
            for rule in set(self._rules) - before | ({"dot"} & set(self._rules)):
                body = self._rules[rule]
                if rule == "dot":
                    body = JSON_DOT
                self._rules[rule] = body.replace("[^", "[^" + JSON_UNSAFE)
            return out

        def visit(self, schema: Any, name: str) -> Any:
            # ["integer"] too: constraints.check_schema lets bounds through for either spelling
            if isinstance(schema, dict) and schema.get("type") in ("integer", ["integer"]) and any(k in schema for k in INT_BOUNDS):
                lo, hi = int_bounds(schema)
                rule_name = name + "-" if name in lg.RESERVED_NAMES else name or "root"
                return self._add_rule(rule_name, f"({min_max_int(lo, hi)}) space")
            return super().visit(schema, name)

    return Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


_CLASS_ESCAPES = {"d": "0-9", "w": "A-Za-z0-9_", "s": " "}  # \s: a space only (JSON escapes the others)
_GBNF_LETTERS = "ntrxuU"  # the escapes with letters GBNF reads itself


def gbnf_escapes(pattern: str) -> str:
    r"""``pattern`` with the regex escapes llama.cpp's GBNF does not read written as it does:
    ``\.``, ``\-``, ``\/``... as ``\xNN`` (the converter copied them, and llama.cpp refused
    the grammar: "unknown escape"), ``\d``, ``\w``, ``\s`` as classes (llama.cpp's own converter
    knows neither), ``\D``/``\W``/``\S`` outside a class as negated ones. A negated escape inside
    a class (``[\S]``) and an escape GBNF has no form for (``\b``, ``\B``, ``\f``...) raise
    SchemaError naming it: llama.cpp refused them with a message about the grammar's root rule."""
    out: list[str] = []
    in_class = False
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            e = pattern[i + 1]
            if e in _CLASS_ESCAPES:
                out.append(_CLASS_ESCAPES[e] if in_class else f"[{_CLASS_ESCAPES[e]}]")
            elif e.lower() in _CLASS_ESCAPES and not in_class:
                out.append(f"[^{_CLASS_ESCAPES[e.lower()]}]")
            elif e.lower() in _CLASS_ESCAPES or (e.isalpha() and e not in _GBNF_LETTERS):
                where = " inside a character class" if in_class else ""
                raise SchemaError(f"The pattern {json.dumps(pattern)} uses \\{e}{where}, which the grammar cannot express.",
                                  "Write it another way (e.g. a class of the characters it allows).")
            elif e.isascii() and not e.isalnum() and e not in "\\\"":
                out.append(f"\\x{ord(e):02X}" if in_class else f"[\\x{ord(e):02X}]")
            else:
                out.append(pattern[i : i + 2])
            i += 2
            continue
        if c == "[":  # (as the converter reads a class: to the first unescaped ']')
            in_class = True
        elif c == "]":
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def int_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    """The inclusive integer range an integer schema's bounds allow; raise SchemaError."""
    lo: int | None = None
    hi: int | None = None
    for key in INT_BOUNDS:
        value = schema.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SchemaError(f"'{key}' must be a number (got {json.dumps(value)}).")
        if key == "minimum":
            lo = max(lo, math.ceil(value)) if lo is not None else math.ceil(value)
        elif key == "exclusiveMinimum":
            lo = max(lo, math.floor(value) + 1) if lo is not None else math.floor(value) + 1
        elif key == "maximum":
            hi = min(hi, math.floor(value)) if hi is not None else math.floor(value)
        else:
            hi = min(hi, math.ceil(value) - 1) if hi is not None else math.ceil(value) - 1
    for v in (lo, hi):
        if v is not None and not _I64[0] < v < _I64[1]:
            raise SchemaError(f"integer bounds must lie within 64-bit integers (got {v}).")
    if lo is not None and hi is not None and lo > hi:
        raise SchemaError(f"no integer lies between the minimum {lo} and the maximum {hi}.")
    return lo, hi


def min_max_int(lo: int | None, hi: int | None, decimals_left: int = 16, top_level: bool = True) -> str:
    """GBNF for the decimal integers from ``lo`` to ``hi`` (either may be open): a port of
    ``build_min_max_int`` in llama.cpp's common/json-schema-to-grammar.cpp (MIT)."""
    out: list[str] = []

    def digit_range(a: str, b: str) -> None:
        out.append(f"[{a}]" if a == b else f"[{a}-{b}]")

    def more_digits(lo_d: int, hi_d: int | None) -> None:
        out.append("[0-9]")
        if lo_d == hi_d == 1:
            return
        out.append("{" + str(lo_d) + ("" if hi_d == lo_d else "," + ("" if hi_d is None else str(hi_d))) + "}")

    def uniform_range(a: str, b: str) -> None:
        i = 0
        while i < len(a) and i < len(b) and a[i] == b[i]:
            i += 1
        if i > 0:
            out.append(f'"{a[:i]}"')
        if i < len(a) and i < len(b):
            if i > 0:
                out.append(" ")
            sub_len = len(a) - i - 1
            if sub_len > 0:
                a_sub, b_sub = a[i + 1:], b[i + 1:]
                zeros, nines = "0" * sub_len, "9" * sub_len
                reached = False
                out.append("(")
                if a_sub == zeros:
                    digit_range(a[i], chr(ord(b[i]) - 1))
                    out.append(" ")
                    more_digits(sub_len, sub_len)
                else:
                    out.append(f"[{a[i]}] (")
                    uniform_range(a_sub, nines)
                    out.append(")")
                    if ord(a[i]) < ord(b[i]) - 1:
                        out.append(" | ")
                        if b_sub == nines:
                            digit_range(chr(ord(a[i]) + 1), b[i])
                            reached = True
                        else:
                            digit_range(chr(ord(a[i]) + 1), chr(ord(b[i]) - 1))
                        out.append(" ")
                        more_digits(sub_len, sub_len)
                if not reached:
                    out.append(" | ")
                    digit_range(b[i], b[i])
                    out.append(" ")
                    uniform_range(zeros, b_sub)
                out.append(")")
            else:
                out.append(f"[{a[i]}-{b[i]}]")

    if lo is not None and hi is not None:
        if lo < 0 and hi < 0:
            return f'"-" ({min_max_int(-hi, -lo, decimals_left, True)})'
        if lo < 0:
            out.append(f'"-" ({min_max_int(0, -lo, decimals_left, True)}) | ')
            lo = 0
        lo_s, hi_s = str(lo), str(hi)
        for digits in range(len(lo_s), len(hi_s)):
            uniform_range(lo_s, "9" * digits)
            lo_s = "1" + "0" * digits
            out.append(" | ")
        uniform_range(lo_s, hi_s)
        return "".join(out)
    less = max(decimals_left - 1, 1)
    if lo is not None:
        if lo < 0:
            out.append(f'"-" ({min_max_int(None, -lo, decimals_left, False)}) | [0] | [1-9] ')
            more_digits(0, decimals_left - 1)
        elif lo == 0:
            if top_level:
                out.append("[0] | [1-9] ")
                more_digits(0, less)
            else:
                more_digits(1, decimals_left)
        elif lo <= 9:
            c, start = str(lo), "1" if top_level else "0"
            if c > start:
                digit_range(start, chr(ord(c) - 1))
                out.append(" ")
                more_digits(1, less)
                out.append(" | ")
            digit_range(c, "9")
            out.append(" ")
            more_digits(0, less)
        else:
            s = str(lo)
            c = s[0]
            if c > "1":
                digit_range("1" if top_level else "0", chr(ord(c) - 1))
                out.append(" ")
                more_digits(len(s), less)
                out.append(" | ")
            # After the first digit: the rest's own digits at least s[1:] (as many of them, its leading
            # zeros kept: llama.cpp recursed on int(s[1:]), so a minimum of 100 let "10".."19" through),
            # or any longer run of digits.
            k = len(s) - 1
            digit_range(c, c)
            out.append(" ((")
            uniform_range(s[1:], "9" * k)
            out.append(")")
            if less is None or less >= k + 1:
                out.append(" | ")
                more_digits(k + 1, less)
            out.append(")")
            if c < "9":
                out.append(" | ")
                digit_range(chr(ord(c) + 1), "9")
                out.append(" ")
                more_digits(len(s) - 1, less)
        return "".join(out)
    if hi is not None:
        if hi >= 0:
            if top_level:
                out.append('"-" [1-9] ')
                more_digits(0, less)
                out.append(" | ")
            out.append(min_max_int(0, hi, decimals_left, True))
        else:
            # (llama.cpp passes top_level false here, which lets "-01" through: not JSON)
            out.append(f'"-" ({min_max_int(-hi, None, decimals_left, True)})')
        return "".join(out)
    raise SchemaError("an integer range needs a minimum or a maximum.")
