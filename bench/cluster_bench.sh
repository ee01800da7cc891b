#!/usr/bin/env bash
# The cluster benchmark of docs/performance.md: `dmoe bench` against `dmoe up`
# clusters of 1+1 and 2+2 nodes, balancing off and on, on tiny-v3 and on a
# 2-layer v2-lite-shape model (made with `dmoe make-model` if missing).
# Prints one JSON line per run (the `dmoe bench --json` object plus the
# configuration), and the one-process decode baseline (decode_bench) first.
#   bench/cluster_bench.sh [requests] [concurrency]
set -euo pipefail
cd "$(dirname "$0")/.."
requests="${1:-64}"
concurrency="${2:-8}"
bin=build/bin
v2l="${DMOE_BENCH_DIR:-/tmp}/dmoe-bench-v2-lite-shape-2l-bf16"
[ -f "$v2l/config.json" ] || "$bin/dmoe" make-model --preset v2-lite-shape --layers 2 --dtype bf16 --out "$v2l" >&2
export UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n

run_one() {  # model label attention expert balance prompt_len max_tokens
  local model=$1 label=$2 an=$3 en=$4 balance=$5 plen=$6 mt=$7 log port pid
  log=$(mktemp)
  "$bin/dmoe" up --model "$model" --attention-nodes "$an" --expert-nodes "$en" --balance "$balance" --port 0 \
    >"$log" 2>"$log.err" &
  pid=$!
  for _ in $(seq 1 600); do
    port=$(sed -n 's/.* on 127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$log" | head -1)
    [ -n "$port" ] && break
    kill -0 "$pid" 2>/dev/null || { echo "dmoe up failed" >&2; return 1; }
    sleep 0.1
  done
  result=$("$bin/dmoe" bench --server "127.0.0.1:$port" --concurrency "$concurrency" --requests "$requests" \
    --prompt-len "$plen" --max-tokens "$mt" --json 2>/dev/null)
  kill -TERM "$pid"; wait "$pid" || true
  phases=$(grep -o 'step phases.*' "$log.err" | tail -1)
  rm -f "$log" "$log.err"
  echo "{\"model\": \"$label\", \"attention_nodes\": $an, \"expert_nodes\": $en, \"balance\": \"$balance\", \"bench\": $result, \"phases\": \"$phases\"}"
}

[ -n "${SKIP_DECODE_BENCH:-}" ] || "$bin/decode_bench" --benchmark_format=json --benchmark_repetitions=3 --benchmark_report_aggregates_only=true \
  2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"decode_bench": [{k: b[k] for k in b if k in ("name","real_time","tokens_per_s","roofline_tokens_per_s","roofline_frac","read_GBps","MB_per_step")} for b in d["benchmarks"] if b.get("aggregate_name")=="median"]}))'
for model in tiny v2l; do
  if [ "$model" = tiny ]; then dir=tests/golden/tiny-v3; plen=32; mt=32; else dir=$v2l; plen=64; mt=32; fi
  for topo in "1 1" "2 2"; do
    for balance in off bias; do
      run_one "$dir" "$model" $topo "$balance" "$plen" "$mt"
    done
  done
done
