#!/usr/bin/env bash
# Serving throughput of two ggufrun trees on one GPU host, in one run (issue 21's "within noise": a
# refactor or a new feature must not slow serving). ggufrun serve at 16 and 64 clients, greedy and
# sampled, 64-token streams (bench/serve_load.py), alternating which tree goes first each round, with
# llama-batched-bench's ceiling once (the first round's new tree). Fresh hosts differ by 10-20%: compare rows of one run only.
# Usage, after `source bench/gpu/setup.sh`:  bash bench/gpu/ab_serve.sh OLD_TREE [ROUNDS]
#   (OLD_TREE: e.g. `git archive BASE | tar x -C .gpuold`, carried beside .gpucarry)
set -u
OLD=$(cd "$1" && pwd); NEW=$(pwd); ROUNDS=${2:-2}
O=${OUT:-results}; mkdir -p "$O"
M=$NEW/.gpubuild/q7.gguf
[ -f "$M" ] || python3 -m ggufrun.cli.main synth --shape qwen2-7b --quant q4_k_m --out "$M" >/dev/null
(cd "$OLD" && python3 setup.py -q build_ext --inplace >/dev/null 2>&1) || echo "old tree: no compiled top-k helper"
run() {  # TREE LABEL ROUND [--no-batched-bench or another flag]
  (cd "$1" && PYTHONPATH="$1:/tmp/llama-py:/tmp/site" timeout 240 python3 bench/serve_load.py --model "$M" --n-gpu-layers -1 \
    --threads 8 --levels 16,64 --requests-per-client 2 --max-tokens 64 --servers ggufrun ${4:---no-batched-bench} \
    --bin "$LLAMA_BIN" --json "$O/ab-$2-$3.json" 2>&1 | grep -E "clients=|ceiling|batched" | sed "s/^ */$2 round $3: /")
}
for r in $(seq 1 "$ROUNDS"); do
  if [ "$r" = 1 ]; then run "$OLD" old "$r"; run "$NEW" new "$r" --sampling=greedy,sampled  # the ceiling, once
  elif [ $((r % 2)) = 1 ]; then run "$OLD" old "$r"; run "$NEW" new "$r"; else run "$NEW" new "$r"; run "$OLD" old "$r"; fi
done
