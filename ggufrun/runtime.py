"""The public face of the llama.cpp boundary (``ggufrun/llama/``), kept for existing callers:
``Model``, ``SeqEmbedder``, ``Sampler``, ``TokenDecoder``, ``GenStats``, ``quantize``, ``quant_types``,
``gpu_info`` and ``system_info``."""

from __future__ import annotations

from .generation import GenStats
from .llama.model import Model, SeqEmbedder, TokenDecoder
from .llama.quantize import quant_types, quantize
from .llama.sampler import DrawChain, Grammar, Sampler
from .llama.system import gpu_info, system_info

__all__ = ["DrawChain", "GenStats", "Grammar", "Model", "Sampler", "SeqEmbedder", "TokenDecoder", "gpu_info", "quant_types", "quantize",
           "system_info"]
