#!/usr/bin/env bash
# Installs the Debian packages dmoe's build needs, only those missing.
# Idempotent and quiet: one `apt-get update`, --no-install-recommends.
# CUDA and NCCL are detected (see CMakeLists.txt), never installed.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  libabsl-dev nlohmann-json3-dev libpcre2-dev
  libopenblas-dev libdnnl-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  prometheus-cpp-dev libucx-dev ucx-utils
  clang libclang-rt-14-dev openssl
  prometheus python3-yaml   # tests/core/metrics (real Prometheus), tests/deploy (promtool)
)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$status" = "installed" ] || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "[setup] all ${#packages[@]} packages present"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
echo "[setup] installing ${#missing[@]} packages: ${missing[*]}"
$sudo apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null
echo "[setup] done"
