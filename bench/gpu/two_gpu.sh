#!/usr/bin/env bash
# Issue 10 on a 2-GPU machine (device kind nvidia-h200-x2), in one device call (docs/nccl.md):
#   1. builds dmoe with CUDA and NCCL (build-gpu);
#   2. the NCCL transport's tests: the framing, the fake-channel FramedTransport, the scheduler's
#      unique id, two ranks on GPU 0 and GPU 1 exchanging tagged messages byte for byte
#      (TwoGpuTest), the conformance suite's Nccl kind (skips below 3 GPUs);
#   3. transfer_bench: per-layer dispatch + reply transfer time at V2-Lite dims for in-process,
#      UCX and NCCL in the same run;
#   4. greedy equality: `dmoe up --device cuda --gpus 2` (attention node on GPU 0, expert node on
#      GPU 1, hidden states over NCCL) against the one-GPU run (`dmoe up --device cuda`) and the
#      CPU reference (`dmoe generate --model`), on tests/golden/tiny-v3's prompts, 16 tokens each;
#   5. end to end on DeepSeek-V2-Lite's dimensions (--load-format dummy): `dmoe bench` against
#      the one-GPU run, the NCCL 1+1 cluster and the UCX 1+1 cluster (both on GPUs 0 and 1), same
#      call, same flags, and the nodes' NCCL send time per MoE layer.
# Every stage runs even when an earlier one fails (a failed build skips what needs binaries);
# TWO_GPU_BUDGET_S (default 560) bounds the script. At most 8 files come back from $OUT:
#   summary.txt  tests.txt  transfer_bench.jsonl  greedy.txt  e2e.txt  logs.txt  gpu.txt
#   here:   EXTRA_DEBS="libopenblas-dev libopenblas0-pthread libopenblas-pthread-dev libopenblas0
#             libgfortran5 libquadmath0" bash ../shared/device/fetch-debs.sh
#   device: source .devdeps/setup-deps.sh .devdeps && bash bench/gpu/two_gpu.sh   (carry .devdeps,
#           kind nvidia-h200-x2, timeout 600)
set -uo pipefail
export PKG_CONFIG_PATH="/opt/deps/usr/lib/x86_64-linux-gnu/pkgconfig:/opt/deps/usr/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
export NCCL_NVLS_ENABLE=0 NCCL_SOCKET_IFNAME=lo UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n
out="${OUT:-/tmp/out}"
work=$(mktemp -d /tmp/two_gpu.XXXXXX)  # intermediate files; the kept ones are copied to $out
mkdir -p "$out"
budget="${TWO_GPU_BUDGET_S:-560}"
summary="$out/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
left() { echo $((budget - SECONDS)); }
stage() {  # NAME MIN_SECONDS_LEFT: false (and a note) when too little time is left
  if [ "$(left)" -lt "$2" ]; then note "$1: SKIPPED (budget: $(left) s left)"; return 1; fi
  echo "=== $1 ($(left) s left)"
}
log() { for f in "$@"; do [ -f "$f" ] && { echo "=== $f"; tail -60 "$f"; } >> "$out/logs.txt"; done; }

{ nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv; nvidia-smi topo -m; } > "$out/gpu.txt" 2>&1
note "gpus: $(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l) ($(sed -n 2p "$out/gpu.txt"))"

built=0
if stage build 200; then
  if cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a \
       -DDMOE_BUILD_BENCH=ON > "$work/configure.log" 2>&1 &&
     grep -q "building dmoe_transport_nccl" "$work/configure.log" &&
     timeout "$(left)" cmake --build build-gpu -j"$(nproc)" --target message_frame_test framed_transport_test \
       nccl_transport_test transport_conformance_test coordinator_transport_test transfer_bench dmoe \
       dmoe-scheduler dmoe-attention-node dmoe-expert-node > "$work/build.log" 2>&1; then
    built=1; note "build: ok ($SECONDS s)"
  else
    note "build: FAILED"; grep -E 'error|NCCL' "$work/configure.log" "$work/build.log" | head -20 | tee -a "$summary"
  fi
  log "$work/configure.log" "$work/build.log"
fi
bin=$PWD/build-gpu/bin

# 2. Tests, each bounded (a hang shows as a timeout, not a stuck call).
if [ $built = 1 ] && stage tests 120; then
  (cd tests
   run_test() {  # NAME ARGS...: one line per test binary in the summary
     local name=$1; shift
     timeout 120 "$bin/$name" "$@" > "$work/test.log" 2>&1; local rc=$?
     cat "$work/test.log" >> "$out/tests.txt"
     note "$name $*: rc=$rc $(grep -E '^\[  (PASSED|FAILED|SKIPPED) +\] [0-9]+ test' "$work/test.log" | tr '\n' ' ')"
   }
   for t in message_frame_test framed_transport_test nccl_transport_test coordinator_transport_test; do run_test $t; done
   run_test transport_conformance_test --gtest_filter='*Nccl*:*Framed*')
fi

# 3. Per-layer transfer time, three transports in one process.
if [ $built = 1 ] && stage transfer_bench 60; then
  timeout 120 "$bin/transfer_bench" --tokens 1,16,64,256,512 --steps 20 > "$out/transfer_bench.jsonl" 2> "$work/transfer_bench.err"
  note "transfer_bench: rc=$?"
  log "$work/transfer_bench.err"
  python3 - "$out/transfer_bench.jsonl" <<'EOF' | tee -a "$summary"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"{'transport':10} {'tokens':>6} {'dispatch B':>10} {'layer RTT p50 us':>16} {'p90 us':>8} {'26 layers ms':>12} {'NCCL send GPU us (disp/reply)':>26}")
for r in rows:
    dev = f"{r.get('dispatch_send_gpu_us_p50', 0):.1f}/{r.get('reply_send_gpu_us_p50', 0):.1f}" if r["transport"] == "nccl" else ""
    print(f"{r['transport']:10} {r['tokens']:>6} {r['dispatch_bytes']:>10} {r['layer_round_trip_us_p50']:>16.1f} {r['layer_round_trip_us_p90']:>8.1f} {r['step_transfer_ms_p50']:>12.2f} {dev:>26}")
EOF
fi

# A cluster in the background; prints its client port once serving. $1: name, rest: dmoe up flags.
start_cluster() {
  local name=$1; shift
  "$bin/dmoe" up --port 0 --timeout 150 "$@" > "$work/$name.up.out" 2> "$work/$name.up.err" &
  echo $! > "$work/$name.pid"
  for _ in $(seq 1 1500); do
    port=$(sed -n 's/.* on 127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$work/$name.up.out" | head -1)
    [ -n "$port" ] && { echo "$port"; return 0; }
    kill -0 "$(cat "$work/$name.pid")" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
stop_cluster() {
  [ -f "$work/$1.pid" ] || return 0
  kill -TERM "$(cat "$work/$1.pid")" 2>/dev/null; wait "$(cat "$work/$1.pid")" 2>/dev/null
  log "$work/$1.up.err"
}
ids_of() { python3 -c 'import json,sys; print(json.load(sys.stdin)["ids"])'; }

# 4. Greedy equality on the golden model: NCCL 1+1 (GPU 0 + GPU 1) against the one-GPU run (one
# process, experts local), and both against the one-process CPU reference.
if [ $built = 1 ] && stage greedy 90; then
  model=tests/golden/tiny-v3
  prompts=$(python3 -c "import json; print(' '.join(','.join(map(str, c['prompt_ids'])) for c in json.load(open('$model/golden.json'))['cases']))")
  if nccl_port=$(start_cluster nccl_tiny --model "$model" --device cuda --gpus 2) &&
     one_port=$(start_cluster one_gpu_tiny --model "$model" --device cuda); then
    same=0; cpu_same=0; total=0
    for ids in $prompts; do
      cpu=$("$bin/dmoe" generate --model "$model" --ids "$ids" --max-tokens 16 --ignore-eos --json)
      one=$(timeout 60 "$bin/dmoe" generate --server "127.0.0.1:$one_port" --ids "$ids" --max-tokens 16 --ignore-eos --json)
      got=$(timeout 60 "$bin/dmoe" generate --server "127.0.0.1:$nccl_port" --ids "$ids" --max-tokens 16 --ignore-eos --json)
      echo "prompt $ids: one_gpu $one nccl_1+1 $got cpu $cpu" >> "$out/greedy.txt"
      total=$((total + 1))
      [ -n "$got" ] && [ "$(echo "$one" | ids_of 2>/dev/null)" = "$(echo "$got" | ids_of 2>/dev/null)" ] && same=$((same + 1))
      [ -n "$got" ] && [ "$(echo "$cpu" | ids_of)" = "$(echo "$got" | ids_of 2>/dev/null)" ] && cpu_same=$((cpu_same + 1))
    done
    note "greedy (16 tokens each): NCCL 1+1 equals the one-GPU run on $same of $total prompts, the CPU reference on $cpu_same of $total"
  else
    note "greedy: a cluster did not start (logs.txt has its log)"
  fi
  stop_cluster nccl_tiny; stop_cluster one_gpu_tiny
  grep -h "NCCL send GPU time per MoE layer" "$work/nccl_tiny.up.err" 2>/dev/null | tee -a "$summary"
fi

# 5. End to end on DeepSeek-V2-Lite's dimensions (27 layers, random weights made on the GPU by
# --load-format dummy): the one-GPU run (one process, experts local), NCCL 1+1 (attention node on
# GPU 0, expert node on GPU 1) and UCX 1+1 on the same GPUs, in this call, same bench flags.
if [ $built = 1 ] && stage e2e 150; then
  v2l="$work/v2-lite-shape-dummy"
  "$bin/dmoe" make-model --preset v2-lite-shape --config-only --out "$v2l" > /dev/null 2> "$work/make_model.err"
  log "$work/make_model.err"
  for run in one_gpu nccl_1+1 ucx_1+1; do
    case $run in
      one_gpu) flags=(--device cuda) ;;
      nccl_1+1) flags=(--device cuda --gpus 2) ;;
      ucx_1+1) flags=(--device cuda --gpus 2 --transport ucx) ;;
    esac
    [ "$(left)" -lt 60 ] && { note "e2e $run: SKIPPED (budget)"; continue; }
    if port=$(start_cluster "e2e_$run" --model "$v2l" --load-format dummy "${flags[@]}"); then
      result=$(timeout 120 "$bin/dmoe" bench --server "127.0.0.1:$port" --concurrency 16 --requests 32 \
        --prompt-len 512 --max-tokens 32 --json 2> /dev/null)
      echo "{\"run\": \"$run\", \"flags\": \"${flags[*]}\", \"bench\": ${result:-null}}" >> "$out/e2e.txt"
      note "e2e $run: ${result:-no result}"
    else
      note "e2e $run: cluster did not start (logs.txt)"
    fi
    stop_cluster "e2e_$run"
  done
  # The nodes log their NCCL send time per MoE layer when they stop (dispatches on the attention
  # node, partial sums on the expert node).
  grep -h "NCCL send GPU time per MoE layer" "$work/e2e_nccl_1+1.up.err" 2>/dev/null | tee -a "$out/e2e.txt" "$summary"
fi
rm -rf "$work"
cat "$summary"
