#!/usr/bin/env bash
# A session's GPU checks in one call (the machine stays warm for only 30 s between calls). Needs
# `source bench/gpu/setup.sh` first. Parts, in the order given:
#   serve  ggufrun serve vs llama-server vs llama-batched-bench, 16 and 64 clients, greedy and sampled (issue 8)
#   json   16 clients, half of them JSON-schema constrained, on both servers (issue 9)
#   chat   ggufrun chat vs llama-bench tg128, two alternating rounds (issue 8)
#   embed  serve memory with embeddings on and off (issue 8)
#   amx    the CPU kernels on this host's AMX Xeon, GPU hidden (issue 13; bench/gpu/amx.sh)
# Usage: bash bench/gpu/checks.sh serve json chat embed amx   (results in $OUT, or results/)
set -u
O=${OUT:-results}; mkdir -p "$O"
M=.gpubuild/q7.gguf
[ -f $M ] || python3 -m ggufrun.cli.main synth --shape qwen2-7b --quant q4_k_m --out $M >/dev/null
python3 -c "import uvicorn" 2>/dev/null || echo "uvicorn missing: put its wheel (and starlette's, h11's) in .gpucarry"
for part in "$@"; do
  echo "== $part"
  case $part in
    serve)
      GGUFRUN_STEP_PROFILE=1 BENCH_SERVER_LOG="$O/serve.log" timeout 240 python3 bench/serve_load.py --model $M \
        --n-gpu-layers -1 --threads 8 --levels 16,64 --requests-per-client 2 --max-tokens 64 --bin "$LLAMA_BIN" \
        --json "$O/serve_load.json" 2>&1 | grep -v '^|--' | tail -22 ;;
    json)
      GGUFRUN_STEP_PROFILE=1 BENCH_SERVER_LOG="$O/json.log" timeout 200 python3 bench/serve_load.py --model $M --n-gpu-layers -1 --threads 8 --levels 16 --requests-per-client 2 \
        --max-tokens 64 --bin "$LLAMA_BIN" --json-schema-half --no-batched-bench --json "$O/serve_json.json" 2>&1 \
        | grep -v '^|--' | tail -22 ;;
    chat)
      timeout 150 python3 bench/chat_speed.py --model $M --threads 8 --n-gpu-layers -1 --rounds 2 --llama-bench "$LLAMA_BIN" 2>&1 | tail -6 ;;
    embed)
      timeout 150 python3 bench/embed_memory.py --model $M --n-gpu-layers -1 --threads 8 2>&1 | tail -4 ;;
    amx)
      timeout 220 bash bench/gpu/amx.sh 2>&1 | tail -30 ;;
    *) echo "unknown part $part" ;;
  esac
done
