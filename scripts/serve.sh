#!/usr/bin/env bash
# Installs what is missing, builds, and starts a dmoe cluster on the bundled
# tiny model (tests/golden/tiny-v3: random weights, DeepSeek-V3 layout):
# a scheduler on 127.0.0.1:50051, 1 attention node and 2 expert nodes.
# Ctrl-C stops it. Extra arguments go to `dmoe up`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
exec build/bin/dmoe up --model tests/golden/tiny-v3 --attention-nodes 1 --expert-nodes 2 "$@"
