#!/usr/bin/env bash
# The whole GPU job in one device call: configure + build with CUDA
# (build-gpu); the CUDA tests (the kernels' cuda_*_test and, where the tree
# has them, the engine's cuda_backend_kernels_test and cuda_engine_test;
# golden_test only with RUN_GOLDEN=1); the kernel benchmarks with the
# plain-PyTorch MLA baseline; the end-to-end benchmark hook (bench/gpu/e2e.sh,
# when present); compute-sanitizer last (memcheck over the CUDA tests,
# racecheck on the shared-memory kernels), with SANITIZER_RESERVE_S (default
# 120) kept for it. Every stage runs even when an earlier one fails (a failed
# build skips what needs its binaries); a short table comes last. Files under
# $OUT (8 at most come back):
#   summary.md  build.log  tests.log  sanitizer.log  profile.md
#   gpu_kernel_bench.json  gpu_kernel_bench.md   (+ e2e.md, by e2e.sh)
#
# OpenBLAS (the CPU backend's BLAS; the GPU image lacks it): a folder
# .devdeps-extra with openblas-min.tar.xz (libopenblas-dev, libopenblas0-pthread,
# libopenblas-pthread-dev, libopenblas0, libgfortran5, libquadmath0 unpacked,
# static and LAPACK libraries dropped), or those .deb files, in .devdeps or
# .devdeps-extra.
# device: source .devdeps/setup-deps.sh .devdeps && bash bench/gpu/run_all.sh
#   (carry .devdeps, and .devdeps-extra if it is separate)
# RUN_ALL_BUDGET_S (default 560) bounds the whole script: stages that would
# start past it are skipped and say so. RUN_ALL_SKIP names stages to skip
# (build tests benchmarks step_bench profile torch_baseline e2e sanitizer).
set -uo pipefail
# It unpacks into /opt/deps: on the GPU machine only (RUN_ALL_FORCE=1 overrides).
if ! command -v nvidia-smi > /dev/null && [ -z "${RUN_ALL_FORCE:-}" ]; then
  echo "run_all.sh: no nvidia-smi here; it is meant for the GPU machine (RUN_ALL_FORCE=1 to run anyway)" >&2
  exit 2
fi
out="${OUT:-/tmp/out}"
mkdir -p "$out"
budget="${RUN_ALL_BUDGET_S:-560}"
summary="$out/summary.md"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
left() { echo $((budget - SECONDS)); }
# stage NAME MIN_SECONDS_LEFT: false (and a note) when too little time is left.
# RUN_ALL_SKIP: stage names to skip, e.g. "benchmarks torch_baseline sanitizer".
stage() {
  case " ${RUN_ALL_SKIP:-} " in *" $1 "*) note "- $1: SKIPPED (RUN_ALL_SKIP)"; return 1 ;; esac
  if [ "$(left)" -lt "$2" ]; then note "- $1: SKIPPED (budget: $(left) s left)"; return 1; fi
  echo "=== $1 ($(left) s left)"
  return 0
}

# OpenBLAS (the CPU backend's BLAS) from .devdeps or .devdeps-extra.
# (.devdeps-extra/openblas-min.tar.xz: those debs unpacked, static and LAPACK
# libraries dropped, xz-compressed: 5 MB instead of 13 against the 64 MiB limit.)
mkdir -p /opt/deps
for d in .devdeps-extra ../.devdeps-extra .devdeps ../.devdeps; do
  if [ -f "$d/openblas-min.tar.xz" ]; then tar -C /opt/deps -xJf "$d/openblas-min.tar.xz"; break; fi
  ls "$d"/libopenblas*.deb > /dev/null 2>&1 || continue
  for f in "$d"/libopenblas*.deb "$d"/libgfortran*.deb "$d"/libquadmath*.deb; do
    [ -f "$f" ] && dpkg -x "$f" /opt/deps
  done
  break
done
ob=/opt/deps/usr/lib/x86_64-linux-gnu/openblas-pthread
if [ -d "$ob/pkgconfig" ]; then
  sed -i -e 's#=/usr/#=/opt/deps/usr/#' "$ob"/pkgconfig/*.pc
  export LD_LIBRARY_PATH="$ob:${LD_LIBRARY_PATH:-}"
  export LIBRARY_PATH="$ob:${LIBRARY_PATH:-}"
fi
export PKG_CONFIG_PATH="$ob/pkgconfig:/opt/deps/usr/lib/x86_64-linux-gnu/pkgconfig:/opt/deps/usr/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"

{
  echo "# GPU run $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  nvcc --version 2>&1 | tail -1
  echo "commit: $(cat .gpu_commit 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo '```'
  echo
} >> "$summary"

# The CUDA test binaries: the kernels' and, where the tree has them, the
# engine's (its CUDA backend kernels and the GPU engine test).
tests="cuda_matmul_test cuda_kernels_test cuda_mla_test"
for t in cuda_backend_kernels_test cuda_engine_test; do
  grep -q "dmoe_test($t " tests/CMakeLists.txt 2>/dev/null && tests="$tests $t"
done

built=0
if stage build 200; then
  {
    cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a \
      -DDMOE_BUILD_BENCH=OFF &&
      cmake --build build-gpu -j"$(nproc)" --target $tests ${RUN_GOLDEN:+golden_test} gpu_kernel_bench decode_step_bench
  } > "$out/build.log" 2>&1 && built=1
  if [ "$built" = 1 ]; then
    note "- build: ok ($SECONDS s)"
  else
    note "- build: FAILED (see build.log)"
    grep -E 'error|Error' "$out/build.log" | head -20 | tee -a "$summary"
  fi
  note "- kernels with register spills (ptxas -v): $(grep -cE ' [1-9][0-9]* bytes spill' "$out/build.log")"
fi

bin=build-gpu/bin
if [ "$built" = 1 ] && stage tests 60; then
  : > "$out/tests.log"
  # golden_test (CPU path) only with RUN_GOLDEN=1: it ran past 240 s on the H200 machine (2026-12-03).
  for t in $tests ${RUN_GOLDEN:+golden_test}; do
    (cd tests && timeout 240 "../$bin/$t" --gtest_brief=1) >> "$out/tests.log" 2>&1
    rc=$?
    res=$(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$out/tests.log" | tail -3 | tr '\n' ' ')
    if [ $rc = 0 ]; then note "- $t: ok"; else note "- $t: FAILED rc=$rc"; fi
  done
  grep -E '^\[  FAILED  \]|Failure|error' "$out/tests.log" | head -20 | tee -a "$summary"
fi

if [ "$built" = 1 ] && stage benchmarks 90; then
  timeout 300 "$bin/gpu_kernel_bench" --json "$out/gpu_kernel_bench.json" --md "$out/gpu_kernel_bench.md" \
    > "$out/gpu_kernel_bench.txt" 2>&1
  rc=$?
  [ $rc = 0 ] && note "- gpu_kernel_bench: ok" || { note "- gpu_kernel_bench: FAILED rc=$rc"; tail -5 "$out/gpu_kernel_bench.txt" | tee -a "$summary"; }
fi
# The engine's decode step without the serving layers: CUDA graphs against
# eager steps (its table goes into summary.md).
if [ "$built" = 1 ] && [ -x "$bin/decode_step_bench" ] && stage step_bench 90; then
  timeout 300 "$bin/decode_step_bench" --md /tmp/decode_step.md > /tmp/decode_step.txt 2>&1
  rc=$?
  if [ $rc = 0 ]; then
    note "- decode_step_bench: ok"
    { echo; echo "decode_step_bench (dummy V2-Lite dims, bf16, prompt 512, 64 timed steps after 8 warm-up):"; echo
      cat /tmp/decode_step.md; grep '^{' /tmp/decode_step.txt | sed 's/^/    /'; } >> "$summary"
  else
    note "- decode_step_bench: FAILED rc=$rc"; tail -5 /tmp/decode_step.txt | tee -a "$summary"
  fi
fi
# Per-kernel device time (ncu, gpu__time_duration only, clocks and caches
# left alone) of eager decode steps at batch 1 and 64 and of one 2048-token
# prefill step: what a step is made of (profile.md).
if [ "$built" = 1 ] && [ -x "$bin/decode_step_bench" ] && command -v ncu > /dev/null && stage profile 120; then
  : > "$out/profile.md"
  for spec in "decode:1:2" "decode:64:2" "prefill:4:1"; do
    IFS=: read -r phase batch steps <<< "$spec"
    [ "$(left)" -lt 60 ] && { note "- profile $phase b$batch: SKIPPED (budget)"; continue; }
    timeout 150 ncu --clock-control none --cache-control none --profile-from-start off \
      --metrics gpu__time_duration.sum --csv --page raw --log-file /tmp/ncu_$phase$batch.csv \
      "$bin/decode_step_bench" --batches "$batch" --modes eager --warmup 2 --steps "$steps" --prefill-seqs 4 \
      --profile "$phase" > /tmp/ncu_$phase$batch.txt 2>&1
    rc=$?
    note "- profile $phase b$batch: rc=$rc"
    grep '^{' /tmp/ncu_$phase$batch.txt | sed 's/^/    /' >> "$out/profile.md"
    python3 bench/gpu/ncu_summary.py /tmp/ncu_$phase$batch.csv --steps "$steps" \
      --title "$phase, batch $batch (eager; $steps step(s) captured)" --sequence 70 >> "$out/profile.md" 2>&1
  done
  # What limits the big kernels: ncu's speed-of-light, occupancy and warp
  # stall sections for layer 1's routed-expert GEMMs (the 5th and 6th
  # grouped GEMM launches) and one MLA launch, in prefill and at batch 64.
  for spec in "prefill:4:GroupedGemmKernel:4:2" "decode:64:GroupedGemmKernel:4:2" "decode:64:MlaAttentionKernel:1:1" \
              "prefill:4:MlaAttentionKernel:1:1"; do
    IFS=: read -r phase batch kernel skip count <<< "$spec"
    [ "$(left)" -lt 60 ] && { note "- kernel detail $phase $kernel: SKIPPED (budget)"; continue; }
    { echo; echo "## ncu detail: $kernel, $phase, batch $batch (launches $skip+ of the captured phase)"; echo; echo '```'
      timeout 120 ncu --clock-control none --profile-from-start off -k "regex:$kernel" --launch-skip "$skip" \
        --launch-count "$count" --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section MemoryWorkloadAnalysis --section LaunchStats \
        "$bin/decode_step_bench" --batches "$batch" --modes eager --warmup 0 --steps 1 --prefill-seqs 4 \
        --profile "$phase" 2>&1 | grep -vE '^\{|^==PROF== (Connected|Disconnected)' | tail -150
      echo '```'; } >> "$out/profile.md"
  done
fi
copy_gbps=$(python3 -c "import json;print(json.load(open('$out/gpu_kernel_bench.json'))['copy']['gbps_read_plus_write'])" 2>/dev/null || echo 0)
if stage torch_baseline 60; then
  PYTHONUNBUFFERED=1 timeout 240 python3 bench/gpu/torch_mla.py --copy-gbps "$copy_gbps" --md "$out/torch_mla.md" \
    --json "$out/torch_mla.json" > "$out/torch_mla.txt" 2>&1
  rc=$?
  [ $rc = 0 ] && note "- torch_mla baseline: ok" || { note "- torch_mla baseline: FAILED rc=$rc"; tail -5 "$out/torch_mla.txt" | tee -a "$summary"; }
fi

# End-to-end benchmark of the serving path (the engine's script), if present;
# SANITIZER_RESERVE_S (default 120) of the budget is kept for the sanitizers.
reserve="${SANITIZER_RESERVE_S:-120}"
if [ -f bench/gpu/e2e.sh ] && stage e2e $((reserve + 60)); then
  E2E_BUDGET_S=$(( $(left) - reserve - 20 )) timeout $(( $(left) - reserve )) bash bench/gpu/e2e.sh "$out" > "$out/e2e.txt" 2>&1
  rc=$?
  [ $rc = 0 ] && note "- e2e.sh: ok" || { note "- e2e.sh: FAILED rc=$rc"; tail -5 "$out/e2e.txt" | tee -a "$summary"; }
fi

if [ "$built" = 1 ] && command -v compute-sanitizer > /dev/null && stage sanitizer 60; then
  : > "$out/sanitizer.log"
  for t in $tests; do
    [ "$(left)" -lt 40 ] && { note "- memcheck $t: SKIPPED (budget)"; continue; }
    (cd tests && timeout $(( $(left) - 30 < 200 ? $(left) - 30 : 200 )) compute-sanitizer --tool memcheck \
      --error-exitcode 3 "../$bin/$t" --gtest_brief=1) >> "$out/sanitizer.log" 2>&1
    rc=$?
    [ $rc = 0 ] && note "- memcheck $t: clean" || note "- memcheck $t: rc=$rc (3 = errors found, 124 = timeout)"
  done
  for spec in "cuda_mla_test:*HeadCounts*" "cuda_kernels_test:*GroupedGemm*:*Gate*:*Moe*"; do
    t=${spec%%:*} filter=${spec#*:}
    [ "$(left)" -lt 40 ] && { note "- racecheck $t: SKIPPED (budget)"; continue; }
    (cd tests && timeout $(( $(left) - 30 < 150 ? $(left) - 30 : 150 )) compute-sanitizer --tool racecheck \
      --error-exitcode 3 "../$bin/$t" --gtest_brief=1 --gtest_filter="$filter") >> "$out/sanitizer.log" 2>&1
    rc=$?
    [ $rc = 0 ] && note "- racecheck $t ($filter): clean" || note "- racecheck $t ($filter): rc=$rc (3 = hazards, 124 = timeout)"
  done
  grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer.log" | sort | uniq -c >> "$summary"
fi

# Fold the small text outputs into the files that come back (8 at most).
for f in gpu_kernel_bench.txt torch_mla.txt torch_mla.json e2e.txt; do
  [ -f "$out/$f" ] && { echo; echo "## $f"; echo '```'; cat "$out/$f"; echo; echo '```'; } >> "$out/tests.log"
  rm -f "$out/$f"
done
[ -f "$out/torch_mla.md" ] && cat "$out/torch_mla.md" >> "$out/gpu_kernel_bench.md" && rm -f "$out/torch_mla.md"

echo
echo "================ summary ($SECONDS s)"
cat "$summary"
if [ -f "$out/gpu_kernel_bench.md" ]; then
  grep -E '^\|' "$out/gpu_kernel_bench.md" | cut -c1-150
fi
