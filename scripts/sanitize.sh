#!/usr/bin/env bash
# Builds and runs tests under a sanitizer, with the CMakePresets.json preset
# of the same name (clang, -O1 -g, CPU only):
#   scripts/sanitize.sh tsan        ThreadSanitizer over the thread pool's
#                                   stress test and the scheduler, transport
#                                   and cluster tests (build-tsan/)
#   scripts/sanitize.sh asan-ubsan  AddressSanitizer + UBSan over every test
#                                   (build-asan/)
# Only the targets the run needs are built. Every sanitizer report, from the
# test binaries or from the server processes they start, is written under
# <build dir>/sanitizer-logs and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${1:-}"
case "${preset}" in
  tsan)
    dir=build-tsan
    # Test binaries as TARGET[:LABEL] (the ctest label is the binary's name
    # unless given); parallel_test is the thread pool's stress test. The soak
    # test (2 minutes of load) is left to the normal build.
    tests=(parallel_test batch_scheduler_test batch_scheduler_stop_test stop_matcher_test
           batch_scheduler_random_test node_failure_test coordinator_test serving_loop_test
           transport_conformance_test transport_byte_identity_test ucx_multiprocess_test
           cluster_test failure_test:failure)
    extra_targets=(ucx_transport_peer dmoe-scheduler dmoe-attention-node dmoe-expert-node)
    ;;
  asan-ubsan)
    dir=build-asan
    tests=()  # all of them
    extra_targets=()
    ;;
  *)
    echo "usage: scripts/sanitize.sh tsan|asan-ubsan" >&2
    exit 2
    ;;
esac

bash scripts/setup.sh
launcher=()
if command -v ccache >/dev/null 2>&1; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
cmake --preset "${preset}" "${launcher[@]}" >/dev/null

targets=()
if [ ${#tests[@]} -gt 0 ]; then
  # Skip tests whose target does not exist in this tree (yet).
  known=$(ninja -C "${dir}" -t targets all | sed -n 's/^\([A-Za-z0-9_.-]*\): phony$/\1/p')
  labels=()
  for t in "${tests[@]}"; do
    target="${t%%:*}"
    if grep -qx "${target}" <<<"${known}"; then
      targets+=("${target}")
      labels+=("${t#*:}")
    else
      echo "[sanitize] no target ${target}; skipped"
    fi
  done
  targets+=("${extra_targets[@]}")
fi
cmake --build "${dir}" -j"$(nproc)" ${targets[@]+--target "${targets[@]}"}

logs="${PWD}/${dir}/sanitizer-logs"
rm -rf "${logs}"
mkdir -p "${logs}"
# Reports go to files (child processes inherit these); each test still fails
# on its own through the sanitizer's exit code. (The TSan runtime reads
# UBSAN_OPTIONS too, so each run sets only its own.)
if [ "${preset}" = tsan ]; then
  # gRPC, protobuf, abseil and UCX come uninstrumented from Debian.
  # tests/tsan/suppressions.txt says which reports inside gRPC's headers are dropped.
  export TSAN_OPTIONS="log_path=${logs}/tsan:ignore_noninstrumented_modules=1:second_deadlock_stack=1:suppressions=${PWD}/tests/tsan/suppressions.txt"
else
  export ASAN_OPTIONS="log_path=${logs}/asan:detect_leaks=1:strict_string_checks=1"
  export UBSAN_OPTIONS="log_path=${logs}/ubsan:print_stacktrace=1:halt_on_error=1"
fi
export UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n

label_args=()
if [ ${#tests[@]} -gt 0 ]; then
  label_args=(-L "^($(IFS='|'; echo "${labels[*]}"))\$")
fi
status=0
(cd "${dir}" && ctest --output-on-failure -j"$(nproc)" --timeout 1800 "${label_args[@]}") || status=$?
if compgen -G "${logs}/*" >/dev/null; then
  echo "[sanitize] ${preset}: sanitizer reports:"
  for f in "${logs}"/*; do
    echo "=== ${f}"
    head -80 "${f}"
  done
  status=1
fi
if [ "${status}" -ne 0 ]; then
  echo "[sanitize] ${preset}: FAILED"
  exit "${status}"
fi
echo "[sanitize] ${preset}: clean"
