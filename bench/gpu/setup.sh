#!/usr/bin/env bash
# Builds llama.cpp with CUDA on a GPU machine that cannot reach the network, from a trimmed copy of the
# llama-cpp-python source package carried in .carry/ (see bench/gpu/README.md). One build serves both
# sides of the comparison: libllama.so for llama-cpp-python (ggufrun) and llama-bench, llama-server and
# llama-batched-bench as the reference, so both run the very same llama.cpp commit and kernels.
# Usage: source bench/gpu/setup.sh   (sets PYTHONPATH, LLAMA_BIN)
set -u
ROOT=$(pwd)
B=$ROOT/.gpubuild
C=.carry; [ -d .gpucarry ] && C=.gpucarry
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $C/*.whl >/dev/null 2>&1
# A build made earlier on a device machine, brought back through $OUT (bench/gpu/README.md): saves
# the ~5-minute CUDA build on a fresh machine. Same layout and path as a build made here.
if [ -e .gpucarry/gb.part.aa ] && [ ! -x "$B/build/bin/llama-batched-bench" ]; then
  mkdir -p "$B/build/bin" && cat .gpucarry/gb.part.* | xz -d | tar xf - -C "$B/build/bin"
fi
# GGML_RPC: ggufrun rpc-worker / --rpc and llama-bench --rpc (a build from before it had none: rebuild).
if [ ! -x "$B/build/bin/llama-batched-bench" ] || [ ! -e "$B/build/bin/libggml-rpc.so" ]; then
  [ -d "$B/vendor" ] || { mkdir -p "$B" && tar xzf .carry/llama-src.tgz -C "$B"; }
  cmake -S "$B/vendor/llama.cpp" -B "$B/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_CUDA=ON -DGGML_RPC=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
  cmake --build "$B/build" -j"$(nproc)" --target llama llama-bench llama-server llama-batched-bench llama-quantize
fi
# The Python side of llama-cpp-python, outside the work tree (the device sync prunes files there),
# loading the CUDA libraries just built.
P=/tmp/llama-py
if [ -e .gpucarry/llama-py.tgz ]; then mkdir -p "$P" && tar xzf .gpucarry/llama-py.tgz -C "$P"
else mkdir -p "$P" && tar xzf .carry/llama-src.tgz -C "$P" llama_cpp; fi
mkdir -p "$P/llama_cpp/lib" && cp -f "$B"/build/bin/*.so* "$P/llama_cpp/lib/" 2>/dev/null
# ggufrun's compiled top-k search (ggufrun/_topk.c), as `pip install` builds it; without Python headers, plain.
SUFFIX=$(python3 -c "import importlib.machinery as m; print(m.EXTENSION_SUFFIXES[0])")
(python3 setup.py -q build_ext --inplace >/dev/null 2>&1 && ls ggufrun/_topk*.so >/dev/null 2>&1) \
  || gcc -O3 -shared -fPIC -DGGUFRUN_TOPK_NO_PYTHON ggufrun/_topk.c -o "ggufrun/_topk$SUFFIX" \
  || echo "ggufrun/_topk.c did not build: sampling uses its numpy path"
export PYTHONPATH=$ROOT:$P:/tmp/site
export LLAMA_BIN=$B/build/bin
export LD_LIBRARY_PATH=$P/llama_cpp/lib:${LD_LIBRARY_PATH:-}
