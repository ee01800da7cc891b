#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz, clang with ASan+UBSan) in
# build-fuzz/ and runs each for a bounded time, starting from the seed corpus
# committed in tests/fuzz/corpus/<target>. New inputs go to
# build-fuzz/corpus/<target>; a crash, leak or UBSan report fails the run and
# leaves the input in build-fuzz/artifacts/ (add it to the seed corpus with a
# regression test once fixed).
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default 20 s, all four)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors_fuzz config_fuzz tokenizer_fuzz generate_request_fuzz)

bash scripts/setup.sh
launcher=()
if command -v ccache >/dev/null 2>&1; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" \
  -DCMAKE_CXX_COMPILER=clang++ -DDMOE_FUZZ=ON -DDMOE_CUDA=OFF \
  -DDMOE_BUILD_TESTS=OFF -DDMOE_BUILD_BENCH=OFF "${launcher[@]}" >/dev/null
cmake --build build-fuzz -j"$(nproc)" --target "${targets[@]}"

mkdir -p build-fuzz/artifacts
failed=()
for t in "${targets[@]}"; do
  name="${t%_fuzz}"
  seeds="tests/fuzz/corpus/${name}"
  work="build-fuzz/corpus/${name}"
  mkdir -p "${work}"
  log="build-fuzz/${t}.log"
  echo "[fuzz] ${t}: ${seconds} s from $(ls "${seeds}" | wc -l) seeds"
  if build-fuzz/bin/"${t}" -max_total_time="${seconds}" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
       -print_final_stats=1 -artifact_prefix="build-fuzz/artifacts/${name}-" \
       "${work}" "${seeds}" >"${log}" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "${log}" | grep -o '[0-9]*$' || echo '?')
    echo "[fuzz] ${t}: ok, ${runs} executions, corpus $(ls "${work}" | wc -l) new + $(ls "${seeds}" | wc -l) seeds"
  else
    echo "[fuzz] ${t}: FAILED (log ${log}):"
    grep -E 'ERROR|runtime error|fuzz property failed|SUMMARY|Test unit written' "${log}" | head -20 || tail -30 "${log}"
    failed+=("${t}")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "[fuzz] failed: ${failed[*]}"
  exit 1
fi
