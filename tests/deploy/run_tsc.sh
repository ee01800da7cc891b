#!/usr/bin/env bash
# tsc --noEmit --strict over one TypeScript file against the packages in
# deploy_tools.sh's directory. Usage: run_tsc.sh FILE.ts (exit 0 = no errors)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tools="$(bash "$here/deploy_tools.sh")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$1" "$work/check.ts"
ln -s "$tools/node_modules" "$work/node_modules"
cat > "$work/tsconfig.json" <<'JSON'
{
  "compilerOptions": {
    "strict": true, "noEmit": true, "target": "ES2022", "module": "NodeNext", "moduleResolution": "NodeNext",
    "skipLibCheck": true, "types": []
  },
  "files": ["check.ts"]
}
JSON
cd "$work"
"$tools/node_modules/.bin/tsc" -p tsconfig.json
