"""A chat request to a reasoning model: thinking on or off in the prompt, its budget, and the
answer's grammar moved past the thinking block.

core.Server.start_chat calls :func:`template_variables` before rendering and :func:`plan` after;
for a model that does not reason both return at once (asking it to think is a 400 naming the
field), so that path costs nothing.
"""

from __future__ import annotations

import re
from typing import Any

from ..reasoning import THINKING, ThinkFormat, detect, plan_reply
from .api_errors import invalid
from .constraints import embed_rules
from .protocol import GenParams


def _on(params: GenParams, settings: Any) -> tuple[bool, int]:
    """(thinking on, budget: -1 none) for the request, the server's budget as the default."""
    budget = params.reasoning_budget if params.reasoning_budget is not None else settings.reasoning_budget
    on = params.thinking if params.thinking is not None else budget != 0
    return on, budget


def template_variables(params: GenParams, fmt: ThinkFormat | None, settings: Any, model_id: str,
                       template_source: str | None = None) -> dict[str, Any]:
    """The template's variables: the request's chat_template_kwargs, and enable_thinking where
    the template reads it. Raises a 400 when a model that does not reason is asked to think, or
    when one served with --reasoning-format none (its thinking left in the answer, unparsed) is
    asked for what needs the thinking parsed: a budget, or turning off a block it cannot switch."""
    if fmt is None:
        unparsed = detect(template_source)  # a reasoning template, served with --reasoning-format none
        if unparsed is None:
            if params.thinking:
                raise invalid(params.thinking_param, f"model '{model_id}' does not reason (its chat template has no "
                              "thinking block; see --reasoning-format), so thinking cannot be turned on.")
            return params.template_kwargs
        if params.reasoning_budget not in (None, -1, 0):
            raise invalid(params.budget_param, f"model '{model_id}' is served with --reasoning-format none: its thinking "
                          "is not parsed, so it cannot be budgeted.")
        if params.thinking is None:
            return params.template_kwargs
        if unparsed.toggle:
            return {**params.template_kwargs, "enable_thinking": params.thinking}
        if not params.thinking:
            raise invalid(params.thinking_param, f"model '{model_id}' is served with --reasoning-format none and its "
                          "template has no switch, so its thinking cannot be turned off.")
        return params.template_kwargs
    on, _ = _on(params, settings)
    if fmt.toggle:
        return {**params.template_kwargs, "enable_thinking": on}
    return params.template_kwargs


def plan(params: GenParams, fmt: ThinkFormat | None, settings: Any, model: Any, tokens: list[int]) -> list[int]:
    """Set ``params.think`` (where the reply starts, the budget) and return the prompt's tokens,
    with what turns thinking off where the template cannot, or opens the block where a grammar
    must start after it. The answer's grammar (json_schema, tools) becomes lazy: triggered at the
    block's close, it constrains the answer, never the thinking."""
    if fmt is None:
        return tokens
    on, budget = _on(params, settings)
    tokens, start, params.think = plan_reply(model, tokens, fmt, on, budget,
                                             open_block=params.grammar is not None and not params.raw_grammar)
    if params.grammar is not None and not params.raw_grammar and start == THINKING:
        params.grammar, params.grammar_triggers = after_block(params.grammar, params.grammar_triggers, fmt)
    return tokens


def after_block(grammar: str, triggers: list[str] | None, fmt: ThinkFormat) -> tuple[str, list[str]]:
    """A grammar for the answer, made to start after the thinking block: a plain grammar applies
    from the close tag on (the tag, space, then the answer); a lazy one (tool_choice auto) keeps
    its triggers, each now looked for only after the close tag."""
    close = re.escape(fmt.close)
    if not triggers:
        rules, root = embed_rules(grammar, "answer")
        # (a few characters of space, as the block's close leaves: unbounded, a small model fills it with newlines)
        return f'root ::= "{fmt.close}" [ \\t\\n]{{0,3}} {root}\n{rules}\n', [close]
    moved = []
    for pattern in triggers:
        if pattern.startswith("^") and pattern.endswith("$"):
            moved.append(rf"^[\s\S]*?{close}{pattern[1:]}")
        else:
            moved.append(rf"^[\s\S]*?{close}[\s\S]*?({pattern})[\s\S]*$")
    return grammar, moved
