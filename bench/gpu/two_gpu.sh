#!/usr/bin/env bash
# Issue 10 on a 2-GPU machine (device kind nvidia-h200-x2), in one device call (docs/nccl.md):
#   1. builds dmoe with CUDA and NCCL;
#   2. the NCCL transport's tests: the framing, the scheduler's unique id, two ranks on GPU 0 and
#      GPU 1 exchanging tagged messages byte for byte (TwoGpuTest), the conformance suite's Nccl
#      kind (skips below 3 GPUs);
#   3. transfer_bench: per-layer dispatch + reply transfer time at V2-Lite dims for in-process,
#      UCX and NCCL in the same run;
#   4. greedy equality: `dmoe up --device cuda --gpus 2` (attention node on GPU 0, expert node on
#      GPU 1, hidden states over NCCL) against the one-process `dmoe generate --model` and against
#      the UCX cluster, on tests/golden/tiny-v3, prompts of the golden cases;
#   5. end to end: `dmoe bench` against the NCCL 1+1 cluster and the UCX 1+1 cluster on a
#      v2-lite-shape model (random weights, 4 layers), same call, same flags, and the nodes' NCCL
#      send time per layer. Compute is still the CPU engine until the CUDA compute path (issue 8)
#      lands; then add its --device flags to the node command lines (cli/cluster_commands.cc).
# Results go to $OUT; a summary table is printed last.
#   here:   EXTRA_DEBS="libopenblas-dev libopenblas0-pthread libopenblas-pthread-dev libopenblas0
#             libgfortran5 libquadmath0" bash ../shared/device/fetch-debs.sh
#   device: source .devdeps/setup-deps.sh .devdeps && bash bench/gpu/two_gpu.sh   (carry .devdeps,
#           kind nvidia-h200-x2, timeout 600)
set -uo pipefail
export PKG_CONFIG_PATH="/opt/deps/usr/lib/x86_64-linux-gnu/pkgconfig:/opt/deps/usr/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
export NCCL_NVLS_ENABLE=0 NCCL_SOCKET_IFNAME=lo UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n
out="${OUT:-/tmp/out}"
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
nvidia-smi topo -m >> "$out/gpu.txt" 2>&1
gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l)
note "gpus: $gpus ($(sed -n 2p "$out/gpu.txt"))"

cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 -DDMOE_BUILD_BENCH=ON \
  > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
grep -q "building dmoe_transport_nccl" "$out/configure.log" || { note "NCCL not found by CMake"; exit 1; }
cmake --build build-gpu -j"$(nproc)" --target message_frame_test nccl_transport_test transport_conformance_test \
  coordinator_transport_test transfer_bench dmoe dmoe-scheduler dmoe-attention-node dmoe-expert-node \
  > "$out/build.log" 2>&1 || { grep -E 'error' "$out/build.log" | head -20; exit 1; }
bin=$PWD/build-gpu/bin

# 2. Tests (bounded: a hang shows as a timeout, not a stuck call).
(cd tests
 for t in message_frame_test nccl_transport_test coordinator_transport_test; do
   timeout 300 "$bin/$t" > "$out/tests.txt.$t" 2>&1; rc=$?
   note "$t: rc=$rc $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$out/tests.txt.$t" | tr '\n' ' ')"
 done
 timeout 300 "$bin/transport_conformance_test" --gtest_filter='*Nccl*' > "$out/tests.txt.conformance" 2>&1
 note "transport_conformance_test (Nccl kind): rc=$? $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$out/tests.txt.conformance" | tr '\n' ' ')")
cat "$out"/tests.txt.* > "$out/tests.txt"; rm -f "$out"/tests.txt.*

# 3. Per-layer transfer time, three transports in one process run.
timeout 300 "$bin/transfer_bench" --tokens 1,16,64,256,512 --steps 20 > "$out/transfer_bench.jsonl" 2> "$out/transfer_bench.err"
note "transfer_bench: rc=$?"
python3 - "$out/transfer_bench.jsonl" <<'EOF' | tee -a "$summary"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"{'transport':10} {'tokens':>6} {'dispatch B':>10} {'layer RTT p50 us':>16} {'p90 us':>8} {'26 layers ms':>12} {'NCCL send GPU us (disp/reply)':>30}")
for r in rows:
    gpu = f"{r.get('dispatch_send_gpu_us_p50', 0):.1f}/{r.get('reply_send_gpu_us_p50', 0):.1f}" if r["transport"] == "nccl" else ""
    print(f"{r['transport']:10} {r['tokens']:>6} {r['dispatch_bytes']:>10} {r['layer_round_trip_us_p50']:>16.1f} {r['layer_round_trip_us_p90']:>8.1f} {r['step_transfer_ms_p50']:>12.2f} {gpu:>30}")
EOF

# A cluster in the background; prints its client port once serving. $1: log prefix, rest: flags.
start_cluster() {
  local name=$1; shift
  "$bin/dmoe" up --port 0 "$@" > "$out/$name.up.out" 2> "$out/$name.up.err" &
  echo $! > "$out/$name.pid"
  for _ in $(seq 1 1200); do
    port=$(sed -n 's/.* on 127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$out/$name.up.out" | head -1)
    [ -n "$port" ] && { echo "$port"; return 0; }
    kill -0 "$(cat "$out/$name.pid")" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
stop_cluster() { kill -TERM "$(cat "$out/$1.pid")" 2>/dev/null; wait "$(cat "$out/$1.pid")" 2>/dev/null; }

# 4. Greedy equality on the golden model.
model=tests/golden/tiny-v3
prompts=$(python3 -c "import json; print(' '.join(','.join(map(str, c['prompt_ids'])) for c in json.load(open('$model/golden.json'))['cases']))")
if nccl_port=$(start_cluster nccl_tiny --model "$model" --device cuda --gpus 2) &&
   ucx_port=$(start_cluster ucx_tiny --model "$model"); then
  ids_of() { python3 -c 'import json,sys; print(json.load(sys.stdin)["ids"])'; }
  same=0; ucx_same=0; total=0
  for ids in $prompts; do
    ref=$("$bin/dmoe" generate --model "$model" --ids "$ids" --max-tokens 16 --ignore-eos --json)
    got=$("$bin/dmoe" generate --server "127.0.0.1:$nccl_port" --ids "$ids" --max-tokens 16 --ignore-eos --json)
    ucx=$("$bin/dmoe" generate --server "127.0.0.1:$ucx_port" --ids "$ids" --max-tokens 16 --ignore-eos --json)
    echo "prompt $ids: ref $ref nccl $got ucx $ucx" >> "$out/greedy.txt"
    total=$((total + 1))
    [ "$(echo "$ref" | ids_of)" = "$(echo "$got" | ids_of)" ] && same=$((same + 1))
    [ "$(echo "$ref" | ids_of)" = "$(echo "$ucx" | ids_of)" ] && ucx_same=$((ucx_same + 1))
  done
  note "greedy vs one process (16 tokens each): NCCL 1+1 (GPU 0 + GPU 1) $same of $total prompts equal, UCX 1+1 $ucx_same of $total"
else
  note "greedy: a cluster did not start; see nccl_tiny.up.err / ucx_tiny.up.err"
  tail -5 "$out/nccl_tiny.up.err" | tee -a "$summary"
fi
stop_cluster nccl_tiny; stop_cluster ucx_tiny

# 5. End to end on V2-Lite dims (dummy weights, 4 layers): NCCL 1+1 against UCX 1+1, same call.
v2l=/tmp/dmoe-v2-lite-shape-4l
"$bin/dmoe" make-model --preset v2-lite-shape --layers 4 --dtype bf16 --out "$v2l" > /dev/null 2> "$out/make_model.err"
for transport in nccl ucx; do
  if [ "$transport" = nccl ]; then flags=(--device cuda --gpus 2); else flags=(); fi
  if port=$(start_cluster "e2e_$transport" --model "$v2l" "${flags[@]}"); then
    "$bin/dmoe" bench --server "127.0.0.1:$port" --concurrency 16 --requests 64 --prompt-len 128 --max-tokens 32 --json \
      > "$out/e2e_$transport.json" 2> /dev/null
    note "e2e $transport 1+1: $(cat "$out/e2e_$transport.json")"
  else
    note "e2e $transport: cluster did not start"
  fi
  stop_cluster "e2e_$transport"
done
# The nodes log their NCCL send time per MoE layer when they stop (dispatches on the attention
# node, partial sums on the expert node).
grep -h 'NCCL send GPU time per MoE layer' "$out/e2e_nccl.up.err" | tee -a "$summary"
cat "$summary"
