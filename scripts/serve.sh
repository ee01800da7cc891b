#!/usr/bin/env bash
# Installs what is missing, builds, and runs dmoe on the bundled tiny model
# (tests/golden/tiny-v3: random weights, DeepSeek-V3 layout).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
prompt="${1:-Multi-Head Latent Attention}"
echo "[serve] dmoe generate --model tests/golden/tiny-v3 --prompt \"$prompt\" --max-tokens 32"
exec build/bin/dmoe generate --model tests/golden/tiny-v3 --prompt "$prompt" --max-tokens 32
