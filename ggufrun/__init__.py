"""ggufrun: find, fetch, chat with, serve and benchmark llama.cpp GGUF models."""

__version__ = "0.1.0"
