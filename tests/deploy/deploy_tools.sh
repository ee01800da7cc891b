#!/usr/bin/env bash
# Installs the npm packages that validate dashboards and manifests offline
# into $DMOE_DEPLOY_TOOLS (default: build/deploy-tools of the repository)
# unless they are there already; prints that directory.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
tools="${DMOE_DEPLOY_TOOLS:-$root/build/deploy-tools}"
packages=(@grafana/schema@13.2.3 typescript@5.9.3 kubernetes-models@5.1.0 kubernetes-types@1.30.0 yaml@2.9.1)
stamp="$tools/.installed-$(echo "${packages[*]}" | md5sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  mkdir -p "$tools"
  # A lock: several tests may install at once.
  exec 9>"$tools/.lock"
  flock 9
  if [ ! -f "$stamp" ]; then
    npm install --prefix "$tools" --no-audit --no-fund --silent --no-save "${packages[@]}" >&2
    touch "$stamp"
  fi
fi
echo "$tools"
