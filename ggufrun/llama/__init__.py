"""The llama.cpp boundary: the only package that imports ``llama_cpp``
(``_lib.py`` loads it; ``grammar``, ``ggml`` and ``devices`` reach its converter and ggml's C API).

``model`` (weights, contexts, decoding, the single-stream loop), ``sampler`` (grammar, draw chain),
``quantize`` and ``system`` (devices, build info). ``ggufrun.runtime`` re-exports the public names.
"""
