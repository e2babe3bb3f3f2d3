"""The llama.cpp boundary: the only package that imports ``llama_cpp`` (in ``_lib.py``).

``model`` (weights, contexts, decoding, the single-stream loop), ``sampler`` (grammar, draw chain),
``quantize`` and ``system`` (devices, build info). ``ggufrun.runtime`` re-exports the public names.
"""
