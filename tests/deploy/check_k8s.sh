#!/usr/bin/env bash
# Validates Kubernetes manifests offline (no API server): types, required
# fields (kubernetes-models) and unknown fields (kubernetes-types + tsc).
# Usage: check_k8s.sh KUSTOMIZE_DIR | FILE.yaml   (exit 0 = valid)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tools="$(bash "$here/deploy_tools.sh")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [ -d "$1" ]; then
  # LoadRestrictionsNone: deploy/k8s/monitoring takes its files from deploy/prometheus.
  kubectl kustomize --load-restrictor LoadRestrictionsNone "$1" > "$work/objects.yaml"
else
  cp "$1" "$work/objects.yaml"
fi
cp "$here/validate_k8s.mjs" "$work/"
ln -s "$tools/node_modules" "$work/node_modules"
status=0
node "$work/validate_k8s.mjs" "$work/objects.yaml" "$work/objects.ts" || status=1
bash "$here/run_tsc.sh" "$work/objects.ts" || status=1
[ $status -eq 0 ] && echo "check_k8s: $1 is valid"
exit $status
