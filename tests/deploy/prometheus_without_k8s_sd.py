#!/usr/bin/env python3
"""Debian's prometheus is built without Kubernetes service discovery, so its
promtool rejects kubernetes_sd_configs. This writes a copy of a config whose
kubernetes_sd_configs (which must be there, role pod) are replaced by a static
target, the rule files resolved next to the original, so promtool can check
everything else (relabelling, rules). Usage: IN.yml OUT.yml"""
import os
import sys

import yaml

src, dst = sys.argv[1], sys.argv[2]
with open(src) as f:
    config = yaml.safe_load(f)
found = 0
for job in config.get("scrape_configs", []):
    sd = job.pop("kubernetes_sd_configs", None)
    if sd is None:
        continue
    if not all(c.get("role") == "pod" for c in sd):
        sys.exit(f"{src}: job {job.get('job_name')}: expected kubernetes_sd_configs with role pod")
    found += 1
    job["static_configs"] = [{"targets": ["127.0.0.1:9400"]}]
if found == 0:
    sys.exit(f"{src}: no kubernetes_sd_configs")
base = os.path.dirname(os.path.abspath(src))
config["rule_files"] = [os.path.join(base, r) for r in config.get("rule_files", [])]
with open(dst, "w") as f:
    yaml.safe_dump(config, f)
print(f"{dst}: {found} Kubernetes job(s) made static")
