"""Time 08_flash_wgmma's warp-specialised cfgs against its default and cuDNN, in rounds that
alternate the order (the median over rounds of each one's median time).

    python scripts/dev_ws_time.py [--cfgs 0,11,12,13] [--rounds 3] [--out DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastmqa import bench, build  # noqa: E402
from fastmqa import kernels as registry  # noqa: E402

from _devcommon import alternating_rounds, prefill_qkv, stamp, write_rows  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cfgs", default="0,11,12,13")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--points", default=None, help="D:causal:S,... (default: D=128 every S, D=64 long S)")
    ap.add_argument("--json", default="ws_time_dev.json")
    ap.add_argument("--sources", default="", help="tag:FILE,... kernels/FILE built as a variant of 08 (its default dispatch)")
    args = ap.parse_args()
    cfgs = [int(c) for c in args.cfgs.split(",")]
    k08 = registry.get("08_flash_wgmma")
    build.build_all([k08])
    variants = {}
    for v in filter(None, args.sources.split(",")):
        tag, src = v.split(":", 1)
        name = f"08_flash_wgmma_{tag}"
        build.load(name, src, strided=True, symbol=build.name_to_symbol(k08.name))
        variants[tag] = dataclasses.replace(k08, name=name, source=src)
    if args.points:
        pts = [(int(d), c == "1", int(s)) for d, c, s in (p.split(":") for p in args.points.split(","))]
    else:
        pts = [(128, c, S) for c in (False, True) for S in (512, 1024, 2048, 4096, 8192, 16384)]
        pts += [(64, c, S) for c in (False, True) for S in (2048, 16384)]
    timer = bench.Timer(reps=30, warmup=3, budget_s=1.0)
    cudnn = bench.torch_paths(small=False)["torch.sdpa_cudnn"]
    rows = []
    for D, causal, S in pts:
        H = 32
        B, q, k, v = prefill_qkv(S, D, H=H)
        fns = {f"cfg{c}": k08.prepare(q, k, v, causal=causal, num_splits=c)[0] for c in cfgs}
        fns.update({tag: kv.prepare(q, k, v, causal=causal)[0] for tag, kv in variants.items()})
        fns["cudnn"] = lambda: cudnn(q, k, v, causal)
        times = alternating_rounds(fns, args.rounds, timer)
        ms = {n: statistics.median(t) for n, t in times.items()}
        fl = bench.attention_flops(B, H, S, S, D, causal)
        row = dict(D=D, causal=causal, S=S, B=B, H=H, ms=ms, rounds=times,
                   tflops={n: fl / t / 1e9 for n, t in ms.items()})
        rows.append(row)
        stamp(f"D={D} causal={causal!s:5} S={S:5}: " + "  ".join(f"{n} {t:4.0f}" for n, t in row["tflops"].items())
              + "  TFLOP/s; vs cfg0: " + " ".join(f"{n} {ms['cfg0'] / t:.3f}" for n, t in ms.items() if n != "cfg0"))
        del q, k, v
    write_rows(args.out, args.json, rows)


if __name__ == "__main__":
    main()
