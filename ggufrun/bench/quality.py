"""Quality maths over logits: KL divergence, top-1 agreement and perplexity against a reference.

Pure numpy: the worker computes the logits, this module only scores them.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

CACHE_BYTES = 3 << 29  # reference log-probs kept in memory: 1.5 GiB bounds the text scored


def chunks(tokens: Sequence[int], n_ctx: int, n_vocab: int) -> list[list[int]]:
    """The text in n_ctx-token chunks, as many as the reference's kept log-probs allow."""
    out = [list(tokens[i : i + n_ctx]) for i in range(0, len(tokens) - n_ctx + 1, n_ctx)] or [list(tokens)]
    per_chunk = (len(out[0]) - len(out[0]) // 2) * n_vocab * 4
    return out[: max(1, CACHE_BYTES // per_chunk)]


def scored_half(chunk: Sequence[int]) -> tuple[int, Any]:
    """Where scoring starts in a chunk, and the tokens predicted from there: the second half, as
    llama-perplexity scores, so every scored token has at least n_ctx/2 tokens of context."""
    import numpy as np

    first = len(chunk) // 2
    return first, np.asarray(chunk[first + 1 :])


def log_softmax(logits: Any) -> Any:
    import numpy as np

    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def compare(ref_lp: Sequence[Any], lps: Iterable[Any], targets: Sequence[Any]) -> dict[str, Any]:
    """Mean KL(reference || model), top-1 agreement and the model's perplexity over all chunks."""
    import numpy as np

    kl_sum = nll_sum = 0.0
    agree = count = 0
    for lp_ref, lp, want in zip(ref_lp, lps, targets):
        kl_sum += float((np.exp(lp_ref) * (lp_ref - lp)).sum())
        agree += int((lp_ref.argmax(axis=1) == lp.argmax(axis=1)).sum())
        nll_sum -= float(lp[np.arange(len(want)), want].sum())
        count += len(want)
    return {"tokens": count, "kl_divergence": kl_sum / count, "top1_agreement": agree / count,
            "perplexity": float(np.exp(nll_sum / count))}
