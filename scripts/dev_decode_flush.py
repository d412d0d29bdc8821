"""How much of the decode suite's gap to the copy ceiling at 64 MiB and more is the timer's flush
(GPU host): 10_decode, SDPA with enable_gqa and a copy of the same K and V, each timed after the
suite's flush (a 256 MB write, which leaves L2 full of dirty lines that DRAM writes back while the
kernel reads) and after a clean one (the same write, then a read of the buffer), side by side.

    python scripts/dev_decode_flush.py [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastmqa import bench  # noqa: E402
from fastmqa import kernels as registry  # noqa: E402

from _devcommon import stamp, write_rows  # noqa: E402

POINTS = [(4, 32768), (16, 16384), (16, 32768), (64, 4096), (64, 16384), (64, 32768)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    H, D, dt = 32, 128, torch.bfloat16
    timers = {"write": bench.Timer(), "clean": bench.Timer(clean_flush=True)}
    ceiling = {name: bench.copy_ceiling(t) for name, t in timers.items()}
    stamp(f"copy ceiling (GB/s, bytes read + written): {ceiling}")
    kern = registry.get("10_decode")
    rows = []
    for B, S in POINTS:
        g = torch.Generator(device="cuda").manual_seed(B * S)
        q = torch.randn(B, H, 1, D, device="cuda", dtype=dt, generator=g)
        k, v = (torch.randn(B, 1, S, D, device="cuda", dtype=dt, generator=g) for _ in range(2))
        lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
        kd, vd = torch.empty_like(k), torch.empty_like(v)
        fns = {"10_decode": kern.prepare(q, k, v, cache_seqlens=lens)[0],
               "torch.sdpa_gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
               "copy": lambda: (kd.copy_(k), vd.copy_(v))}
        kv = 2 * B * S * D * 2
        for name, t in timers.items():
            times = t.side_by_side(fns)
            ms = {m: statistics.median(x) for m, x in times.items()}
            row = dict(B=B, S=S, kv_bytes=kv, flush=name, ceiling_gbps=round(ceiling[name], 1),
                       **{f"{m}_ms": round(x, 5) for m, x in ms.items()},
                       of_ceiling=round(kv / ms["10_decode"] / 1e6 / ceiling[name], 3),
                       sdpa_of_ceiling=round(kv / ms["torch.sdpa_gqa"] / 1e6 / ceiling[name], 3),
                       x_sdpa=round(ms["torch.sdpa_gqa"] / ms["10_decode"], 3))
            rows.append(row)
            stamp(f"B={B:3d} S={S:6d} {name:5s}: ours {ms['10_decode'] * 1e3:7.1f} us ({row['of_ceiling']:.2f} of the "
                  f"ceiling), SDPA {ms['torch.sdpa_gqa'] * 1e3:7.1f} us ({row['sdpa_of_ceiling']:.2f}), "
                  f"copy {ms['copy'] * 1e3:7.1f} us")
        del q, k, v, kd, vd
        torch.cuda.empty_cache()
    write_rows(args.out, "decode_flush_dev.json", rows)


if __name__ == "__main__":
    main()
