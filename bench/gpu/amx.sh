#!/usr/bin/env bash
# Issue 13 on the GPU host's Intel Xeon (AMX), with the GPU hidden so that ggufrun and llama-bench run on
# the CPU: (1) how this host's libggml-cpu was compiled and what its tile-config code looks like (the
# root cause of the AMX crash is a GCC that deletes the tile configuration's stores; see
# ggufrun/llama/amx.py); (2) ggufrun's AMX check, raw; (3) bench/cpu_kernels.py, pp512/tg128 against
# llama-bench in alternating rounds, for ggufrun's default (the guard) and GGUFRUN_AMX_BUFFERS=1.
# About 2.5 minutes; needs setup.sh's build (.gpubuild/build, made by an earlier `source bench/gpu/setup.sh`),
# or another native build: LLAMA_BIN (its bin folder) with PYTHONPATH/LD_LIBRARY_PATH already pointing ggufrun at it.
# Usage: bash bench/gpu/amx.sh   (results in $OUT, or results/)
set -u
O=${OUT:-results}; mkdir -p "$O"
if [ -z "${LLAMA_BIN:-}" ]; then
  [ -x .gpubuild/build/bin/llama-bench ] || { echo "no .gpubuild/build: run 'source bench/gpu/setup.sh' first (it builds)"; exit 2; }
  source bench/gpu/setup.sh
fi
export CUDA_VISIBLE_DEVICES=
export GGUFRUN_HOME=/tmp/ggufrun-amx-home; rm -rf "$GGUFRUN_HOME"  # the AMX check runs afresh, not from a cache
LIB=$LLAMA_BIN/libggml-cpu.so
echo "== CPU and build"
lscpu | grep -m1 'Model name'; grep -o -m1 'amx[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
gcc --version | head -1
command -v readelf >/dev/null && readelf -p .comment "$LIB" 2>/dev/null | grep -i gcc | sort -u | head -3
# this GCC's intrinsic: an asm with a pointer-wide "m" operand is the bug, __builtin_ia32_ldtilecfg the fix
H=$(echo '#include <immintrin.h>' | gcc -mamx-tile -E -x c - 2>/dev/null | grep -o '"[^"]*amxtileintrin.h"' | head -1 | tr -d '"')
[ -n "$H" ] && grep -A3 '^_tile_loadconfig' "$H" | tr -s ' \n' ' '; echo
if command -v objdump >/dev/null; then
  # the stores before each ldtilecfg: a whole 64-byte config has rows (8/16) and colsb (32/64) stored into it
  echo "-- code before ldtilecfg in $LIB:"
  objdump -d --no-show-raw-insn "$LIB" | grep -B7 'ldtilecfg' | head -24
fi
echo "== ggufrun's AMX check, raw (a tiny model's logits with AMX buffers vs without; exit 139 = SIGSEGV, 132 = SIGILL)"
timeout 60 env GGUFRUN_AMX_BUFFERS=1 python3 -m ggufrun.llama.amx; echo "exit $?"
echo "== pp512/tg128: ggufrun (guard's default, AMX forced on) vs llama-bench, 8 threads, 2 rounds"
[ -f .gpubuild/q05.gguf ] || python3 -m ggufrun.cli.main synth --shape qwen2-0.5b --quant q4_k_m --out .gpubuild/q05.gguf
timeout 200 python3 bench/cpu_kernels.py --llama-bench "$LLAMA_BIN/llama-bench" --model .gpubuild/q05.gguf --threads 8 \
  --rounds 2 -r 5 --variant default: --variant amx-on:GGUFRUN_AMX_BUFFERS=1 --json "$O/cpu_kernels_amx.json"
echo "cpu_kernels exit $?"
cat "$GGUFRUN_HOME/amx-check.json" 2>/dev/null; echo
