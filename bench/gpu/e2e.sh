#!/usr/bin/env bash
# End-to-end GPU benchmark (issue 8, item 7), for the device machine in the
# same call as bench/gpu/run_all.sh (which builds build-gpu first):
#   1. `dmoe up --device cuda --load-format dummy` on DeepSeek-V2-Lite's real
#      dimensions (27 layers, random weights generated on the GPU; one
#      process: attention and experts), then `dmoe bench` with prompt 512,
#      256 output tokens, concurrency 1, 16, 64, 256: output tok/s, TTFT and
#      ITL p50/p99;
#   2. HF transformers DeepseekV2ForCausalLM with random weights of the same
#      shapes (bf16, eager), model.generate at batch 1, 16, 64: output tok/s;
#   3. the bandwidth roofline per batch: device-to-device copy bandwidth
#      measured here, over the bytes a decode step must read (non-expert
#      weights, the routed experts B tokens touch, the latent cache at the
#      mean context).
# Every step logs its failure and the script goes on; stages that would
# start with too little of E2E_BUDGET_S left are skipped and say so. One
# file comes back: $OUT/e2e.md (the table, failures, the raw JSON lines and
# the log's tail); a copy goes to bench/results/gpu_e2e.md.
#   bash bench/gpu/e2e.sh [out dir, default $OUT]   (E2E_BUILD_DIR default build-gpu)
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${1:-${OUT:-/tmp/out}}"
build="${E2E_BUILD_DIR:-build-gpu}"
bin="$build/bin"
budget="${E2E_BUDGET_S:-1500}"
mkdir -p "$out" bench/results
work="$(mktemp -d /tmp/dmoe-e2e-XXXXXX)"
jsonl="$work/e2e.jsonl"
log="$work/e2e.log"
: > "$jsonl"
: > "$log"
left() { echo $((budget - SECONDS)); }
prompt_len="${E2E_PROMPT_LEN:-512}"
max_tokens="${E2E_MAX_TOKENS:-256}"
concurrencies="${E2E_CONCURRENCY:-1 16 64 256}"
hf_batches="${E2E_HF_BATCHES:-1 16 64}"
hf_new_tokens="${E2E_HF_NEW_TOKENS:-$max_tokens}"
hf_timeout="${E2E_HF_TIMEOUT_S:-420}"
up_timeout="${E2E_UP_TIMEOUT_S:-600}"
# Tokens per scheduler step (the scheduler's default is 512): 2048 lets a
# prefill step carry 4 prompts of 512, so the routed experts' weights are
# read once per 4 prompts.
max_batch_tokens="${E2E_MAX_BATCH_TOKENS:-2048}"
python="${PYTHON:-python3}"
# Dry runs elsewhere: E2E_DEVICE=cpu E2E_PRESET=tiny E2E_PROMPT_LEN=16 E2E_MAX_TOKENS=8 ...
device="${E2E_DEVICE:-cuda}"
preset="${E2E_PRESET:-v2-lite-shape}"
export UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n
# OpenBLAS where run_all.sh unpacks it, when this script runs on its own.
ob=/opt/deps/usr/lib/x86_64-linux-gnu/openblas-pthread
[ -d "$ob" ] && export LD_LIBRARY_PATH="$ob:${LD_LIBRARY_PATH:-}"

note() { echo "[e2e $(date +%T)] $*" | tee -a "$log" >&2; }
fail() {
  local msg="$*"
  msg=${msg//\"/\'}
  msg=${msg//$'\n'/ }
  note "FAILED: $msg"
  echo "{\"failed\": \"$msg\"}" >> "$jsonl"
}

gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
[ -n "$gpu_name" ] || fail "nvidia-smi"
# The serving binaries (a no-op when run_all.sh built them already).
if [ ! -x "$bin/dmoe-attention-node" ] || [ ! -x "$bin/dmoe-scheduler" ] || [ ! -x "$bin/dmoe" ]; then
  note "building dmoe, dmoe-scheduler, dmoe-attention-node, dmoe-expert-node in $build"
  cmake --build "$build" -j"$(nproc)" --target dmoe dmoe-scheduler dmoe-attention-node dmoe-expert-node \
    >> "$log" 2>&1 || fail "build of the serving binaries"
fi
# The engine's GPU tests (its own kernels against host references; golden
# logits and greedy on the device, GPU vs CPU decode across pages, dummy
# weights at V2-Lite dims), unless run_all.sh ran them: by default only when
# this script runs on its own (run_all.sh sets E2E_BUDGET_S and runs them
# itself, under compute-sanitizer too); E2E_RUN_ENGINE_TEST=0/1 overrides.
if [ "${E2E_RUN_ENGINE_TEST:-$([ -n "${E2E_BUDGET_S:-}" ] && echo 0 || echo 1)}" = 1 ] && [ "$(left)" -gt 300 ]; then
  cmake --build "$build" -j"$(nproc)" --target cuda_backend_kernels_test cuda_engine_test >> "$log" 2>&1 \
    || fail "build of cuda_backend_kernels_test / cuda_engine_test"
  : > "$work/engine_test.log"
  for t in cuda_backend_kernels_test cuda_engine_test; do
    [ -x "$bin/$t" ] || continue
    (cd tests && timeout 240 "../$bin/$t" --gtest_brief=1) >> "$work/engine_test.log" 2>&1
    rc=$?
    if [ $rc = 0 ]; then note "$t: ok"; else fail "$t rc=$rc"; fi
  done
  grep -E '^\[cuda|^\[  (PASSED|FAILED|SKIPPED) |Failure|Expected|Which is|error' "$work/engine_test.log" | head -60 >> "$log"
fi
model="$work/$preset-dummy"
if ! "$bin/dmoe" make-model --preset "$preset" --config-only --out "$model" >> "$log" 2>&1; then
  fail "make-model --config-only"
fi

# --- 1. dmoe on the GPU -------------------------------------------------------
run_dmoe() {
  local up_out="$work/up.out" up_err="$work/up.err" port="" pid
  echo "{\"max_batch_tokens\": $max_batch_tokens}" > "$work/scheduler.json"
  "$bin/dmoe" up --model "$model" --device "$device" --load-format dummy --expert-nodes 0 --port 0 \
    --config "$work/scheduler.json" --timeout "$up_timeout" \
    > "$up_out" 2> "$up_err" &
  pid=$!
  for _ in $(seq 1 $((up_timeout * 10))); do
    port=$(sed -n 's/.* on 127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$up_out" | head -1)
    [ -n "$port" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$port" ]; then
    fail "dmoe up --device $device did not come up (tail of its log follows)"
    tail -20 "$up_err" | tee -a "$log" >&2
    kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    return 1
  fi
  note "dmoe up serving on port $port ($(grep -c . "$up_err") log lines)"
  # Warm-up (first-use allocations, cuBLAS heuristics); not reported.
  "$bin/dmoe" bench --server "127.0.0.1:$port" --concurrency 4 --requests 4 --prompt-len "$prompt_len" \
    --max-tokens 16 --json >> "$log" 2>&1 || fail "warm-up bench"
  for c in $concurrencies; do
    local requests=$(( c < 4 ? 4 : c )) result
    # Keep time for the HF baseline (its batch 1 and 16 need about 60 s).
    if [ "$(left)" -lt 100 ]; then fail "dmoe bench concurrency $c: SKIPPED (budget: $(left) s left)"; continue; fi
    note "dmoe bench: concurrency $c, $requests requests, prompt $prompt_len, $max_tokens out"
    if result=$(timeout $(( $(left) - 80 )) "$bin/dmoe" bench --server "127.0.0.1:$port" --concurrency "$c" --requests "$requests" \
        --prompt-len "$prompt_len" --max-tokens "$max_tokens" --json 2>> "$log"); then
      echo "{\"system\": \"dmoe\", \"device\": \"$device\", \"gpu\": \"$gpu_name\", \"concurrency\": $c, \"bench\": $result}" >> "$jsonl"
    else
      fail "dmoe bench concurrency $c (output: ${result:-none})"
    fi
  done
  kill -TERM "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
  { echo "--- dmoe up log (head and tail)"; head -30 "$up_err"; echo "..."; tail -30 "$up_err"; } >> "$log"
}


# --- 2 + 3. HF transformers baseline and the roofline (python) ---------------
cat > "$work/e2e.py" <<'PY'
import json, os, sys, time
import torch

mode, out_path, model_dir, prompt_len, new_tokens, batches, gpu = sys.argv[1:8]
prompt_len, new_tokens = int(prompt_len), int(new_tokens)
batches = [int(b) for b in batches.split()]
cfg_json = json.load(open(os.path.join(model_dir, "config.json")))


def emit(obj):
    with open(out_path, "a") as f:
        f.write(json.dumps(obj) + "\n")
    print(json.dumps(obj), flush=True)


def roofline():
    # Copy bandwidth: read + write of a 2 GiB device buffer, best of 10.
    best = float("nan")
    try:
        a = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda")
        b = torch.empty_like(a)
        b.copy_(a)
        torch.cuda.synchronize()
        best = 0.0
        for _ in range(10):
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            s.record(); b.copy_(a); e.record(); torch.cuda.synchronize()
            best = max(best, 2 * a.numel() * 2 / (s.elapsed_time(e) / 1e3) / 1e9)
        del a, b
        torch.cuda.empty_cache()
        emit({"system": "copy", "gpu": gpu, "copy_GBps": best})
    except Exception as ex:  # noqa: BLE001
        emit({"failed": f"copy bandwidth: {ex!r}"})
    # Bytes a decode step reads at batch B: bf16 weights (every non-expert
    # weight, the routed experts B tokens touch under uniform routing) and
    # the bf16 latent cache at the mean context.
    c = cfg_json
    D, V, L, H = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"], c["num_attention_heads"]
    dn, dr, dv, r = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    E, k, Ie = c["n_routed_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"]
    S, I, dense = c["n_shared_experts"] or 0, c["intermediate_size"], c["first_k_dense_replace"]
    rq = c.get("q_lora_rank") or 0
    q = H * (dn + dr) * (rq or D) + rq * D
    attn = q + (r + dr) * D + H * (dn + dv) * r + D * H * dv
    nonexp = L * attn + dense * 3 * I * D + (L - dense) * (3 * S * Ie * D + E * D) + V * D
    for B in sorted(set(batches + [1, 16, 64, 256])):
        touched = E * (1 - (1 - k / E) ** B)
        ctx = prompt_len + new_tokens / 2
        step = 2 * (nonexp + (L - dense) * touched * 3 * Ie * D) + B * ctx * L * (r + dr) * 2
        emit({"system": "roofline", "gpu": gpu, "batch": B, "step_GB": step / 1e9, "copy_GBps": best,
              "roofline_output_tokens_per_s": B * best * 1e9 / step if best == best else None})


def hf():
    try:
        import transformers
        from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
        keys = {kk: vv for kk, vv in cfg_json.items() if kk != "architectures"}
        try:
            cfg = DeepseekV2Config(**keys)
        except Exception as ex:  # noqa: BLE001  (rope keys renamed across versions)
            emit({"system": "hf", "event": "config without rope_scaling (throughput unaffected)", "why": repr(ex)})
            keys.pop("rope_scaling", None)
            cfg = DeepseekV2Config(**keys)
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)  # build in bf16: float32 first would need twice the memory
        t0 = time.time()
        with torch.device("cuda"):
            model = DeepseekV2ForCausalLM(cfg).eval()
        emit({"system": "hf", "event": "loaded", "transformers": transformers.__version__, "torch": torch.__version__,
              "init_s": time.time() - t0, "params": sum(p.numel() for p in model.parameters()),
              "attn_implementation": getattr(model.config, "_attn_implementation", None)})
    except Exception as ex:  # noqa: BLE001
        emit({"failed": f"HF model: {ex!r}"})
        return
    for B in batches:
        try:
            ids = torch.randint(2, cfg.vocab_size, (B, prompt_len), device="cuda")
            mask = torch.ones_like(ids)
            with torch.no_grad():
                model.generate(ids[:, :32], attention_mask=mask[:, :32], max_new_tokens=4, min_new_tokens=4,
                               do_sample=False, pad_token_id=0)
                torch.cuda.synchronize()
                t0 = time.time()
                out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                torch.cuda.synchronize()
            dt = time.time() - t0
            emit({"system": "hf", "gpu": gpu, "batch": B, "prompt_len": prompt_len, "new_tokens": new_tokens,
                  "seconds": dt, "output_tokens_per_s": (out.shape[1] - prompt_len) * B / dt})
        except Exception as ex:  # noqa: BLE001
            emit({"failed": f"HF batch {B}: {ex!r}"})
        torch.cuda.empty_cache()


roofline() if mode == "roofline" else hf()
PY

if [ "$(left)" -gt 30 ]; then
  note "roofline: copy bandwidth and step bytes"
  timeout 60 "$python" "$work/e2e.py" roofline "$jsonl" "$model" "$prompt_len" "$max_tokens" "$concurrencies" \
    "$gpu_name" >> "$log" 2>&1 || fail "roofline (exit $?)"
fi
if [ "$(left)" -gt 90 ]; then
  run_dmoe || note "dmoe part incomplete"
else
  fail "dmoe bench: SKIPPED (budget: $(left) s left)"
fi
if [ "$(left)" -gt 40 ]; then
  t=$(( $(left) - 15 < hf_timeout ? $(left) - 15 : hf_timeout ))
  note "HF transformers baseline: batches $hf_batches, $hf_new_tokens new tokens (timeout ${t}s)"
  timeout "$t" "$python" "$work/e2e.py" hf "$jsonl" "$model" "$prompt_len" "$hf_new_tokens" "$hf_batches" \
    "$gpu_name" >> "$log" 2>&1 || fail "HF baseline (exit $?; batches done before it stopped are kept)"
else
  fail "HF baseline: SKIPPED (budget: $(left) s left)"
fi

# --- summary: the one file that comes back -------------------------------------
{
  "$python" - "$jsonl" "$preset" "$device" "$prompt_len" "$max_tokens" "$max_batch_tokens" <<'PY' || echo "(summary script failed)"
import json, sys
rows = []
for line in open(sys.argv[1]):
    try:
        rows.append(json.loads(line))
    except ValueError:
        pass
dm = {r["concurrency"]: r["bench"] for r in rows if r.get("system") == "dmoe"}
hf = {r["batch"]: r for r in rows if r.get("system") == "hf" and "batch" in r}
roof = {r["batch"]: r for r in rows if r.get("system") == "roofline"}
copy = [r for r in rows if r.get("system") == "copy"]
preset, device, plen, mt, mbt = sys.argv[2:7]
print(f"# dmoe end to end: dmoe up --device {device} --load-format dummy, preset {preset} (all layers), "
      f"prompt {plen}, {mt} out; HF transformers and the roofline beside it\n")
print(f"dmoe: one process (attention + experts), scheduler max_batch_tokens {mbt}, `dmoe bench` with "
      "requests = max(concurrency, 4), ignore_eos. HF: DeepseekV2ForCausalLM, random bf16 weights, "
      "model.generate at batch = concurrency, min_new_tokens = max_new_tokens.\n")
if copy:
    print(f"copy bandwidth {copy[0]['copy_GBps']:.0f} GB/s (read + write) on {copy[0]['gpu']}\n")
print("| concurrency | dmoe out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors | HF out tok/s | x HF | roofline tok/s | % of roofline |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
f = lambda v, s=1: "-" if v is None else f"{v * s:.1f}"
for c in sorted(set(dm) | set(hf) | set(roof)):
    b = dm.get(c, {})
    t = b.get("output_tokens_per_s")
    h = hf.get(c, {}).get("output_tokens_per_s")
    rf = roof.get(c, {}).get("roofline_output_tokens_per_s")
    print(f"| {c} | {f(t)} | {f(b.get('ttft_s', {}).get('p50'), 1e3)} | {f(b.get('ttft_s', {}).get('p99'), 1e3)} | "
          f"{f(b.get('itl_s', {}).get('p50'), 1e3)} | {f(b.get('itl_s', {}).get('p99'), 1e3)} | {b.get('errors', '-')} | "
          f"{f(h)} | {f(t / h if t and h else None)} | {f(rf)} | {f(100 * t / rf if t and rf else None)} |")
fails = [r["failed"] for r in rows if "failed" in r]
if fails:
    print("\nfailures:\n" + "\n".join(f"- {x}" for x in fails))
PY
  echo
  echo "## raw results (JSON lines)"
  echo '```'
  cat "$jsonl"
  echo '```'
  echo "## log (tail)"
  echo '```'
  tail -120 "$log"
  echo '```'
  if [ -f "$work/engine_test.log" ]; then
    echo "## cuda_engine_test"
    echo '```'
    tail -60 "$work/engine_test.log"
    echo '```'
  fi
} > "$out/e2e.md"
[ "$device" = cuda ] && cp "$out/e2e.md" bench/results/gpu_e2e.md 2>/dev/null
head -20 "$out/e2e.md" >&2
rm -rf "$work"
exit 0
