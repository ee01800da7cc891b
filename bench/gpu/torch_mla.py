"""Plain-PyTorch baseline for MLA absorbed decode: bmm / softmax / bmm over
the same latent (contiguous [B, ctx, 576] bf16 per batch, the favourable case
for torch: no paging), at the dims and sizes of gpu_kernel_bench.

Bytes counted as in gpu_kernel_bench: latent read + q (bf16) + out (fp32) + LSE.
Times: CUDA events around batches of back-to-back calls, median of 5, after
warm-up; small working sets rotate over several copies (no L2 re-reads).

  python3 torch_mla.py --json out.json --md out.md [--copy-gbps X]
"""
import argparse
import json

import torch

H, R, DR = 128, 512, 64
W = R + DR


def attn(q, kv, scale):
    s = torch.bmm(q, kv.transpose(1, 2)).float() * scale  # [B, H, ctx]
    p = torch.softmax(s, dim=-1)
    return torch.bmm(p.to(torch.bfloat16), kv[:, :, :R])  # [B, H, R]


def time_ms(fn, reps=20, batches=5):
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    ms = []
    for b in range(batches):
        a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for r in range(reps):
            fn(b * reps + r)
        e.record()
        e.synchronize()
        ms.append(a.elapsed_time(e) / reps)
    ms.sort()
    return ms[len(ms) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--md")
    ap.add_argument("--copy-gbps", type=float, default=0.0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    batches = [1, 64] if args.quick else [1, 16, 64, 128]
    contexts = [1024, 16384] if args.quick else [1024, 4096, 16384]
    budget = 128 * 16384 * W  # elements of the largest case
    rows, md = [], []
    md.append("## Plain PyTorch MLA decode (bmm, float32 softmax, bmm), torch %s\n" % torch.__version__)
    md.append("| batch | context | time (us) | GB/s | % copy |\n|---|---|---|---|---|")
    for B in batches:
        for ctx in contexts:
            sets = max(1, min(8, budget // (B * ctx * W)))
            try:
                kvs = [torch.empty(B, ctx, W, device=dev, dtype=torch.bfloat16).uniform_(-1, 1) for _ in range(sets)]
                q = torch.empty(B, H, W, device=dev, dtype=torch.bfloat16).uniform_(-1, 1)
                ms = time_ms(lambda i: attn(q, kvs[i % sets], 0.135234))
            except torch.cuda.OutOfMemoryError as e:  # report, never hide
                print("torch B=%d ctx=%d: out of memory: %s" % (B, ctx, e))
                rows.append({"batch": B, "context": ctx, "error": "out of memory"})
                md.append("| %d | %d | OOM | | |" % (B, ctx))
                continue
            finally:
                torch.cuda.empty_cache()
            nbytes = B * ctx * W * 2 + B * H * W * 2 + B * H * (R + 1) * 4
            gbs = nbytes / (ms * 1e-3) / 1e9
            pct = 100 * gbs / args.copy_gbps if args.copy_gbps else 0.0
            rows.append({"batch": B, "context": ctx, "us": round(ms * 1e3, 2), "gbps": round(gbs, 1),
                         "pct_copy": round(pct, 1), "rotated_sets": sets})
            md.append("| %d | %d | %.1f | %.0f | %.1f |" % (B, ctx, ms * 1e3, gbs, pct))
            print("torch MLA %4d %6d %9.1f us %7.0f GB/s %5.1f%%" % (B, ctx, ms * 1e3, gbs, pct), flush=True)
            del kvs, q
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "mla_decode": rows}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
