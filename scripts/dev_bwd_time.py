"""Time the backward kernels (07_flash_bwd, 12_flash_bwd_wgmma and variants of 12 built with -D
knobs) against SDPA's FLASH and cuDNN backward, in rounds that alternate the order (the median
over rounds of each one's median time).

    python scripts/dev_bwd_time.py [--variants sync:FASTMQA_BWD_SYNC=1] [--points D:causal:S,...]
        [--rounds 3] [--out DIR] [--json bwd_time_dev.json]

A variant "tag:MACRO=V;MACRO2=V2" is 12_flash_bwd_wgmma.cu built with those macros.
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

from _devcommon import alternating_rounds, parse_variants, stamp, write_rows  # noqa: E402


def variant_runner(kern, tag, defines):
    """kern's backward built with `defines`, as a prepare_backward that launches it."""
    src = kern.backward
    name = f"{Path(src).stem}_{tag}"
    mod = build.load(name, src, backward=True, defines=defines, symbol=build.name_to_symbol(Path(src).stem))
    real_load = build.load

    def prepare(*a, **kw):
        build.load = lambda *x, **y: mod  # prepare_backward loads its module through fastmqa.build.load
        try:
            return kern.prepare_backward(*a, **kw)
        finally:
            build.load = real_load
    return prepare


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--variants", default="")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--points", default="128:0:4096,128:0:16384,128:1:4096,128:1:16384,64:0:8192,64:1:8192")
    ap.add_argument("--json", default="bwd_time_dev.json")
    args = ap.parse_args()
    k06, k08 = registry.get("06_flash_mma"), registry.get("08_flash_wgmma")
    build.build_all([k06, k08])
    preps = {"07": k06.prepare_backward, "12": k08.prepare_backward}
    for tag, defs in parse_variants(args.variants).items():
        preps[f"12_{tag}"] = variant_runner(k08, tag, defs)
    pts = [(int(d), c == "1", int(s)) for d, c, s in (p.split(":") for p in args.points.split(","))]
    timer = bench.Timer(reps=20, warmup=2, budget_s=1.0)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    for D, causal, S in pts:
        H, B = 32, max(1, 16384 // S)
        gen = torch.Generator(device="cuda").manual_seed(S)
        q, k, v, dout = (torch.randn(sh, device="cuda", dtype=torch.bfloat16, generator=gen)
                         for sh in ((B, H, S, D), (B, 1, S, D), (B, 1, S, D), (B, H, S, D)))
        o, lse = k08(q, k, v, causal=causal, return_lse=True)
        fns = {n: p(dout, q, k, v, o, lse, causal=causal)[0] for n, p in preps.items()}
        outs = {}
        for backend, name, expanded in ((SDPBackend.FLASH_ATTENTION, "fa2", False), (SDPBackend.CUDNN_ATTENTION, "cudnn", True)):
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            with sdpa_kernel([backend]):
                ka, va = (kk.expand(-1, H, -1, -1), vv.expand(-1, H, -1, -1)) if expanded else (kk, vv)
                out = torch.nn.functional.scaled_dot_product_attention(qq, ka, va, is_causal=causal, enable_gqa=not expanded)
            outs[name] = (out, qq, kk, vv)
            fns[name] = (lambda t=outs[name]: torch.autograd.grad(t[0], t[1:], dout, retain_graph=True))
        times = alternating_rounds(fns, args.rounds, timer)
        ms = {n: statistics.median(t) for n, t in times.items()}
        fl = 2.5 * bench.attention_flops(B, H, S, S, D, causal)
        row = dict(D=D, causal=causal, S=S, B=B, H=H, ms=ms, rounds=times, tflops={n: fl / t / 1e9 for n, t in ms.items()})
        rows.append(row)
        stamp(f"D={D} causal={causal!s:5} S={S:5}: " + "  ".join(f"{n} {t:4.0f}" for n, t in row["tflops"].items())
              + "  TFLOP/s; vs 12: " + " ".join(f"{n} {ms['12'] / t:.3f}" for n, t in ms.items() if n != "12"))
        del q, k, v, dout, o, lse, outs
    write_rows(args.out, args.json, rows)


if __name__ == "__main__":
    main()
