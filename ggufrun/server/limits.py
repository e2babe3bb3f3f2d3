"""What one request may ask of a model, checked against that model before llama.cpp or numpy
sees it (each a 400 naming the field; the limits are documented in the README).

llama.cpp trusts token ids (an id past the vocabulary reads out of bounds) and grammar text (see
gbnf.py); tokenising text full of special-token strings costs time quadratic in their number. So
token ids are checked against the vocabulary here, text is tokenised off the event loop within
a size budget, and a request's totals (messages, embedding inputs, tokens) are bounded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..images import image_row
from .api_errors import ApiError, invalid
from .gbnf import check_gbnf

MAX_MESSAGES = 1024  # messages in one chat request
MAX_EMBED_INPUTS = 256  # inputs in one embeddings request
MAX_EMBED_TOKENS = 16_384  # tokens in one embeddings request, all inputs together
MAX_REQUEST_TOKENS = 65_536  # prompt tokens in one generation request, all prompts together
MAX_TOKENIZE_BYTES = 256 * 1024  # text tokenised in one request (special-token parsing is quadratic)


def check_messages(count: int, param: str = "messages") -> None:
    if count > MAX_MESSAGES:
        raise invalid(param, f"at most {MAX_MESSAGES} messages per request (got {count}).")


def check_text_size(texts: Sequence[str], param: str) -> None:
    """Refuse more than MAX_TOKENIZE_BYTES of text to tokenise, before any is."""
    size = sum(len(t) for t in texts)  # characters: a cheap lower bound on the bytes
    if size > MAX_TOKENIZE_BYTES:
        raise invalid(param, f"at most {MAX_TOKENIZE_BYTES} characters of text per request (got {size}).")


def check_token_ids(ids: Sequence[int], n_vocab: int, param: str) -> None:
    """Every id a token of the vocabulary."""
    bad = next((t for t in ids if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise invalid(param, f"token id {bad} is outside the vocabulary (ids 0 to {n_vocab - 1}).")


def check_generation(model: Any, prompts: list[list[int]], n: int, logit_bias: dict[int, float] | None,
                     grammar: str | None, grammar_param: str) -> None:
    """Off the event loop, once the prompts are tokenised: token ids against the vocabulary
    (prompts, logit_bias, the grammar's token references) and the request's total tokens."""
    n_vocab = model.n_vocab
    for j, prompt in enumerate(prompts):  # image tokens pass only where the model holds their image (images.py)
        check_token_ids([t for t in prompt if t >= 0 or image_row(t)[0] not in model.images], n_vocab,
                        "prompt" if len(prompts) == 1 else f"prompt[{j}]")
    if logit_bias:
        check_token_ids(list(logit_bias), n_vocab, "logit_bias")
    if grammar is not None:
        shape = check_gbnf(grammar, grammar_param)
        check_token_ids(sorted(shape.token_ids), n_vocab, grammar_param)
    total = sum(len(p) for p in prompts) * n
    if total > MAX_REQUEST_TOKENS:
        raise ApiError(400, f"The request's prompts come to {total} tokens (times n); at most {MAX_REQUEST_TOKENS} "
                       "are accepted per request.", param="prompt", kind="exceed_context_size_error")


def compile_grammars(model: Any, grammar: str | None, triggers: Sequence[str] | None, count: int) -> list[Any]:
    """``count`` compiled grammars for a request's jobs (llama.cpp parses each: off the event
    loop); [] without a grammar. Raise GrammarError (400) when llama.cpp rejects it."""
    if grammar is None:
        return []
    out: list[Any] = []
    try:
        for _ in range(count):
            out.append(model.grammar(grammar, triggers or ()))
    except BaseException:
        for g in out:
            g.close()
        raise
    return out


def embedding_limit(backend: Any) -> tuple[int, str]:
    """The most tokens one text may have, and what sets it. On the generation context a text goes
    through in chunks of the steps' batches (engine.py): its sequence's cells are the limit. An
    embedding model's own context pools one batch."""
    if backend.embed_seq is not None and not backend.model.pools_embeddings:
        return backend.model.seq_cells, "(a sequence's context). Split the text or serve with a larger --n-ctx."
    return backend.model.n_batch, "(the batch size). Split the text or serve with a larger --batch-size."


def embedding_tokens(model: Any, inputs: Sequence[str | list[int]], limit: tuple[int, str] | None = None) -> list[list[int]]:
    """Off the event loop: each embeddings input as the token ids the engine embeds, checked (ids
    in the vocabulary, a text within ``limit`` (:func:`embedding_limit`; default one batch), the
    request within MAX_EMBED_TOKENS). Token-id inputs are embedded as given: turning them into text
    and back would lose special tokens."""
    most, why = limit or (model.n_batch, "(the batch size). Split the text or serve with a larger --batch-size.")
    if len(inputs) > MAX_EMBED_INPUTS:
        raise invalid("input", f"at most {MAX_EMBED_INPUTS} inputs per request (got {len(inputs)}).")
    check_text_size([t for t in inputs if isinstance(t, str)], "input")
    out: list[list[int]] = []
    total = 0
    for i, item in enumerate(inputs):
        where = f"input[{i}]" if len(inputs) > 1 else "input"
        if isinstance(item, list):
            check_token_ids(item, model.n_vocab, where)
            tokens = list(item)
        else:
            tokens = model.tokenize(item)
        if len(tokens) > most:  # longer would be cut
            raise ApiError(400, f"Invalid '{where}': it has {len(tokens)} tokens; at most {most} can be embedded {why}",
                           param=where, kind="exceed_context_size_error")
        total += len(tokens)
        if total > MAX_EMBED_TOKENS:
            raise invalid("input", f"at most {MAX_EMBED_TOKENS} tokens per request, all inputs together.")
        out.append(tokens)
    return out
