"""The llama.cpp boundary: the only package that imports ``llama_cpp``
(``_lib.py`` loads it; ``grammar``, ``ggml`` and ``devices`` reach its converter and ggml's C API).

``model`` (weights, contexts, decoding, the single-stream loop), ``sampler`` (grammar, draw chain;
``grammar_filter`` finds the tokens a grammar may allow without asking it about every one),
``quantize`` and ``system`` (devices, build info). ``ggufrun.runtime`` re-exports the public names.
"""
