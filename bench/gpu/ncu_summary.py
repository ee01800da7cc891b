#!/usr/bin/env python3
"""Per-kernel device time from an `ncu --csv --page raw --metrics
gpu__time_duration.sum` log: kernels grouped by name (template arguments and
parameters dropped), sorted by total time, and the first --sequence kernels
in launch order (one layer's sequence, to see what a step is made of).

usage: ncu_summary.py LOG --title T [--steps S] [--sequence N] >> profile.md
"""
import argparse
import collections
import csv
import io
import re


def short(name):
    name = name.split("(")[0] if not name.startswith("void ") else name[5:].split("(")[0]
    depth, out = 0, []
    for ch in name:  # drop template arguments
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return re.sub(r"^.*::", "", "".join(out).strip())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--title", required=True)
    ap.add_argument("--steps", type=int, default=1, help="steps the capture holds (totals are divided by it)")
    ap.add_argument("--sequence", type=int, default=60)
    a = ap.parse_args()
    lines = open(a.log, errors="replace").read().splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    print(f"\n## {a.title}\n")
    if start is None:
        print("no ncu CSV in the log; its tail:\n\n```\n" + "\n".join(lines[-15:]) + "\n```")
        return
    rows = list(csv.reader(io.StringIO("\n".join(l for l in lines[start:] if l.startswith('"')))))
    head, rows = rows[0], rows[2:]  # the second row holds the units
    ki, ti = head.index("Kernel Name"), head.index("gpu__time_duration.sum")
    gi = head.index("Grid Size") if "Grid Size" in head else None
    seq = []
    for r in rows:
        try:
            seq.append((short(r[ki]), float(r[ti].replace(",", "")) / 1e3, r[gi] if gi is not None else ""))
        except (ValueError, IndexError):
            continue
    total = sum(t for _, t, _ in seq)
    by = collections.OrderedDict()
    for n, t, _ in seq:
        c, s = by.get(n, (0, 0.0))
        by[n] = (c + 1, s + t)
    print(f"{len(seq)} kernels, {total / 1e3:.3f} ms of kernel time in all, "
          f"{total / 1e3 / a.steps:.3f} ms per step ({a.steps} steps; gpu__time_duration, kernels serialized)\n")
    print("| kernel | launches per step | us per step | mean us | % |\n|---|---|---|---|---|")
    for n, (c, s) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print(f"| {n} | {c / a.steps:.0f} | {s / a.steps:.1f} | {s / c:.2f} | {100 * s / total:.1f} |")
    print(f"\nfirst {a.sequence} kernels in launch order (us, grid):\n\n```")
    for n, t, g in seq[: a.sequence]:
        print(f"{t:9.2f}  {n}  {g}")
    print("```")


if __name__ == "__main__":
    main()
