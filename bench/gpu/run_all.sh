#!/usr/bin/env bash
# On the GPU machine (the device tool): builds dmoe with CUDA and runs the
# CUDA kernel test and the golden CPU test there. Results go to $OUT.
#   here:   EXTRA_DEBS="libopenblas-dev libopenblas0-pthread libopenblas-pthread-dev libopenblas0
#             libgfortran5 libquadmath0" bash ../shared/device/fetch-debs.sh
#   device: source .devdeps/setup-deps.sh .devdeps && bash bench/gpu/run_all.sh   (carry .devdeps)
set -uo pipefail
# Debian's pkg-config files (OpenBLAS, PCRE2) unpacked by setup-deps.sh.
export PKG_CONFIG_PATH="/opt/deps/usr/lib/x86_64-linux-gnu/pkgconfig:/opt/deps/usr/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
out="${OUT:-/tmp/out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DDMOE_BUILD_BENCH=OFF > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
cmake --build build-gpu --target cuda_matmul_test golden_test -j"$(nproc)" > "$out/build.log" 2>&1 \
  || { grep -E 'error' "$out/build.log" | head -20; exit 1; }
cd tests
../build-gpu/bin/cuda_matmul_test 2>&1 | tee "$out/cuda_matmul_test.txt" | tail -5
../build-gpu/bin/golden_test 2>&1 | tee "$out/golden_test.txt" | tail -3
