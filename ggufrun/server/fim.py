"""Fill-in-the-middle prompts for ``/infill`` and ``suffix`` on ``/v1/completions``, built as
llama-server's ``format_prompt_infill`` builds them (tools/server/server-common.cpp), so a coder
model sees the same tokens under either server:

    [FIM_REP]myproject\\n [FIM_SEP]{filename}\\n{text} ... [FIM_SEP]filename\\n      (repo-level tokens present)
    [BOS][FIM_PRE]{prefix}{prompt}[FIM_SUF]{suffix}[FIM_MID]

Without FIM_REP/FIM_SEP the extra chunks go first, each after a "--- snippet ---" line. The
prefix keeps its last 3/4 of a batch, the suffix what is left of the batch's last quarter, the
extra chunks what the context leaves after a batch and twice the reply (their last tokens).
``prompt`` sits at the end of the prefix, where llama-server's code puts it (its README says
after FIM_MID; its code is what the models meet).
"""

from __future__ import annotations

from typing import Any

from .api_errors import ApiError, invalid
from .limits import check_text_size, check_token_ids

_SNIPPET = "\n\n--- snippet ---\n\n"  # llama-server's chunk separator where the model has no FIM_SEP


def missing(specials: dict[str, int]) -> str:
    """What the model lacks for fill-in-the-middle ("" when it has the prefix, suffix and middle tokens)."""
    return " ".join(f"{what} token is missing." for key, what in (("fim_pre", "prefix"), ("fim_suf", "suffix"),
                                                                   ("fim_mid", "middle")) if specials[key] < 0)


def refuse_without_fim(model_id: str, specials: dict[str, int], param: str) -> None:
    """A 400 naming the model, for a model that has no FIM tokens (llama-server's message, and what to use)."""
    lacking = missing(specials)
    if lacking:
        raise ApiError(400, f"Infill is not supported by model '{model_id}': {lacking} Serve a code model with FIM tokens "
                       "(tokenizer.ggml.fim_pre/suf/mid_token_id), e.g. Qwen2.5-Coder, or send a plain prompt.",
                       param=param, kind="not_supported_error")


def check_extra(value: Any) -> list[dict[str, str]]:
    """``input_extra``: a list of {"text": str, "filename"?: str}; llama-server's checks and messages."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("input_extra", 'must be an array of {"filename": string, "text": string}.')
    out = []
    for i, chunk in enumerate(value):
        if not isinstance(chunk, dict) or not isinstance(chunk.get("text"), str):
            raise invalid(f"input_extra[{i}]", 'a chunk must contain a "text" field with a string value.')
        # "time": when llama.vim / llama.vscode picked the chunk, their own bookkeeping, which
        # llama-server does not read either (checked as a number or vim's reltime list, then unused)
        unknown = set(chunk) - {"text", "filename", "time"}
        if unknown:
            raise invalid(f"input_extra[{i}].{sorted(unknown)[0]}", 'a chunk has only "filename", "text" and "time".')
        if "time" in chunk and not _timestamp(chunk["time"]):
            raise invalid(f"input_extra[{i}].time", "must be a number (or a list of numbers, as vim's reltime()).")
        name = chunk.get("filename", "tmp")
        if not isinstance(name, str):
            raise invalid(f"input_extra[{i}].filename", "must be a string.")
        out.append({"text": chunk["text"], "filename": name})
    check_text_size([c["text"] + c["filename"] for c in out], "input_extra")
    return out


def _timestamp(value: Any) -> bool:
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    return number(value) or (isinstance(value, list) and len(value) <= 4 and all(number(v) for v in value))


def check_mixed(value: Any, param: str) -> str | list[str | int]:
    """``input_prefix`` / ``input_suffix``: a string, or token ids and strings mixed (llama-server's tokenize_mixed)."""
    if isinstance(value, str):
        check_text_size([value], param)
        return value
    if isinstance(value, list) and all(isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in value):
        check_text_size([v for v in value if isinstance(v, str)], param)
        return value
    raise invalid(param, "expected a string, or a list of token ids and strings.")


def tokenize_mixed(model: Any, value: str | list[str | int], param: str) -> list[int]:
    """Text as plain text (special-token strings are not parsed: code may contain them) and ids as given."""
    parts = [value] if isinstance(value, str) else value
    out: list[int] = []
    for part in parts:
        if isinstance(part, str):
            out += model.tokenize(part, add_special=False, parse_special=False) if part else []
        else:
            check_token_ids([part], model.n_vocab, param)
            out.append(part)
    return out


def infill_tokens(model: Any, specials: dict[str, int], prefix: str | list[str | int], suffix: str | list[str | int],
                  extra: list[dict[str, str]], prompt: list[int], *, n_batch: int, n_predict: int, n_ctx: int) -> list[int]:
    """The prompt tokens llama-server's format_prompt_infill makes of these parts (see the module
    docstring). ``n_predict``: the reply's limit, -1 for none; llama-server reads its server-wide
    --n-predict there (default -1), ggufrun the request's, the room the extra context must leave."""
    def plain(text: str) -> list[int]:
        return model.tokenize(text, add_special=False, parse_special=False) if text else []

    pre_t = tokenize_mixed(model, prefix, "input_prefix")
    suf_t = tokenize_mixed(model, suffix, "input_suffix")
    extra_t: list[int] = []
    if specials["fim_rep"] >= 0:
        extra_t += [specials["fim_rep"], *plain("myproject\n")]
    for chunk in extra:
        if specials["fim_sep"] >= 0:
            extra_t += [specials["fim_sep"], *plain(chunk["filename"] + "\n")]
        else:
            extra_t += plain(_SNIPPET)
        extra_t += plain(chunk["text"])
    if specials["fim_sep"] >= 0:
        extra_t += [specials["fim_sep"], *plain("filename\n")]

    n_prefix = min(len(pre_t), 3 * (n_batch // 4))
    n_suffix = min(len(suf_t), max(0, n_batch // 4 - (2 + len(prompt))))
    n_extra = min(max(0, n_ctx - n_batch - 2 * n_predict), len(extra_t))
    head = [specials["fim_pre"], *pre_t[len(pre_t) - n_prefix:], *prompt]
    tail = [specials["fim_suf"], *suf_t[:n_suffix]]
    if specials["add_bos"] and model.bos_id >= 0:
        head.insert(0, model.bos_id)
    return [*extra_t[len(extra_t) - n_extra:], *head, *tail, specials["fim_mid"]]


def suffix_prompt(model: Any, model_id: str, prompt: str | list[int], suffix: str, *, n_ctx: int, n_predict: int) -> list[int]:
    """``/v1/completions`` with ``suffix``: the prompt is the prefix, as /infill with no extra context."""
    specials = model.vocab_specials()
    refuse_without_fim(model_id, specials, "suffix")
    return infill_tokens(model, specials, list(prompt) if isinstance(prompt, list) else prompt, suffix, [], [],
                         n_batch=model.n_batch, n_predict=n_predict, n_ctx=n_ctx)
