#!/usr/bin/env bash
# Installs what is missing, builds, and runs every test (ctest); then the
# sanitizer and fuzzing stages CI runs (docs/testing.md):
#   ThreadSanitizer over the thread pool, scheduler, transport and cluster
#   tests (scripts/sanitize.sh tsan, build-tsan/), and every libFuzzer target
#   for DMOE_FUZZ_SECONDS each (default 20; scripts/fuzz.sh, build-fuzz/).
# Extra arguments go to CMake for the main build, e.g. -DDMOE_CUDA=OFF.
# DMOE_TEST_STAGES=main runs only the first stage.
set -euo pipefail
cd "$(dirname "$0")/.."
stage_start=$SECONDS
stage_done() {
  echo "[test] $1: done in $((SECONDS - stage_start)) s"
  stage_start=$SECONDS
}

bash scripts/build.sh "$@"
(cd build && ctest --output-on-failure -j"$(nproc)" --timeout 900)
stage_done "build and test"
if [ "${DMOE_TEST_STAGES:-all}" = main ]; then exit 0; fi

bash scripts/sanitize.sh tsan
stage_done "ThreadSanitizer"
bash scripts/fuzz.sh "${DMOE_FUZZ_SECONDS:-20}"
stage_done "fuzzing"
