#!/usr/bin/env bash
# Type-checks a Grafana dashboard JSON offline against @grafana/schema with
# TypeScript (tsc --noEmit --strict, see grafana_dashboard_types.ts).
# Usage: check_dashboard.sh DASHBOARD.json   (exit 0 = valid)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
ts="$(mktemp --suffix=.ts)"
trap 'rm -f "$ts"' EXIT
{
  cat "$here/grafana_dashboard_types.ts"
  printf '\nexport const dashboard: DmoeDashboard = '
  cat "$1"
  printf ';\n'
} > "$ts"
bash "$here/run_tsc.sh" "$ts"
echo "check_dashboard: $1 type-checks against @grafana/schema"
