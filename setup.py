"""The one compiled part of ggufrun (ggufrun/_topk.c, loaded through ctypes); everything else is
in pyproject.toml. ``optional``: without a C compiler the install still succeeds and sampling uses
its numpy path (``ggufrun bench`` says which)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("ggufrun._topk", ["ggufrun/_topk.c"], extra_compile_args=["-O3"], optional=True)])
