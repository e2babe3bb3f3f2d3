"""The llama.cpp boundary: the only package (with runtime.py) that imports llama_cpp."""
