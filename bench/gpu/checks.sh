#!/usr/bin/env bash
# The GPU checks of one session (the machine stays warm for 30 s only, so they run as two calls:
# `checks.sh serve` and `checks.sh rest`). Needs `source bench/gpu/setup.sh` and .gpubuild/q7.gguf
# (ggufrun synth --shape qwen2-7b --quant q4_k_m). Results go to $OUT (or results/).
set -u
O=${OUT:-results}; mkdir -p "$O"
M=.gpubuild/q7.gguf
if [ "${1:-serve}" = serve ]; then
  echo "== sampling cost per step (16 cores)"
  timeout 60 python3 bench/sampling_speed.py --steps 15 2>&1 | tail -5
  echo "== serving, 16 and 64 clients, greedy and sampled"
  timeout 200 python3 bench/serve_load.py --model $M --n-gpu-layers -1 --threads 8 --levels 16,64 \
    --requests-per-client 2 --max-tokens 64 --bin "$LLAMA_BIN" --json "$O/serve_load.json" 2>"$O/serve_load.log" | tail -18
  exit 0
fi
echo "== chat vs llama-bench tg128"
timeout 150 python3 bench/chat_speed.py --model $M --threads 8 --n-gpu-layers -1 --rounds 1 --llama-bench "$LLAMA_BIN" 2>&1 | tail -6
echo "== auto offload with only ~3.5 GB of the card free (the rest held by another process)"
timeout 120 python3 - "$M" <<'PY'
import subprocess, sys, torch
free, total = torch.cuda.mem_get_info()
hold = torch.empty(int(free - 3.5e9), dtype=torch.uint8, device="cuda")
r = subprocess.run([sys.executable, "-m", "ggufrun.cli.main", "chat", sys.argv[1], "-p", "Count to fifty", "--max-tokens", "64",
                    "--temperature", "0", "-v"], capture_output=True, text=True)
print("exit", r.returncode)
print("\n".join(line for line in r.stderr.splitlines() if "layers" in line or "tok/s" in line or "Error" in line))
PY
echo "== embeddings' memory"
timeout 150 python3 bench/embed_memory.py --model $M --n-gpu-layers -1 --threads 8 2>&1 | tail -3
