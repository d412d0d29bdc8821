"""Short rows in 08_flash_wgmma: check forced cfgs on the shape grid against the float64 reference,
then time them side by side (paired repetitions, own L2 flush each) against the two-CTA kernel,
the dispatched default and cuDNN at the prefill suite's points.

    python scripts/dev_short_rows.py [--cfgs 12,13,14] [--points D:causal:S,...] [--reps 40] [--out DIR]
        [--variants TAG:MACRO=V,...]

cfg numbers are 08's `num_splits` switches (ws_cfg in kernels/08_flash_wgmma.cu); "two" is the
two-CTA kernel (num_splits = 2 at D = 128), "auto" the dispatched default.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from fastmqa import bench, build, gridcheck  # noqa: E402
from fastmqa import kernels as registry  # noqa: E402

from _devcommon import prefill_qkv, stamp, write_rows  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cfgs", default="12,13,14")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--points", default=None, help="D:causal:S,... (default: D = 128, S = 512 ... 8192, both masks)")
    ap.add_argument("--json", default="short_rows_dev.json")
    ap.add_argument("--no-grid", action="store_true")
    ap.add_argument("--bshd", action="store_true", help="q in the (B, S, H, D) memory layout a layer's projection gives")
    ap.add_argument("--variants", default="", help="TAG:MACRO=V,... also time 08 built with -DMACRO=V (its default "
                                                     "dispatch as TAG, its two-CTA kernel as TAG.two)")
    args = ap.parse_args()
    cfgs = [int(c) for c in args.cfgs.split(",")]
    k08 = registry.get("08_flash_wgmma")
    var = [v.split(":", 1) for v in filter(None, args.variants.split(","))]
    with ThreadPoolExecutor(max_workers=1 + len(var)) as ex:
        jobs = [ex.submit(build.build_all, [k08])]
        jobs += [ex.submit(build.load_variant, k08, tag, [define]) for tag, define in var]
        results = [j.result() for j in jobs]
    variants = dict(zip((tag for tag, _ in var), results[1:]))
    stamp("built")
    grid = {}
    if not args.no_grid:
        for c in cfgs:
            cases = gridcheck.run_grid(k08, fn=lambda q, k, v, causal, c=c: k08(q, k, v, causal=causal, num_splits=c))
            bad = [x for x in cases if not x.ok]
            grid[f"cfg{c}"] = dict(cases=len(cases), failed=len(bad), worst=max(x.max_err / x.tol for x in cases))
            stamp(f"grid cfg{c}: {len(cases) - len(bad)}/{len(cases)} ok, worst err/tol "
                  f"{grid[f'cfg{c}']['worst']:.2f}" + "".join(f"\n   FAIL {x}" for x in bad[:5]))
            # q as a projection lays it out, (B, S, H, D) viewed as (B, H, S, D): same bits as dense q
            for (B, H, S, causal) in [(3, 32, 100, True), (2, 8, 257, False), (1, 64, 77, True)]:
                x = torch.randn(B, S, H, 128, device="cuda", dtype=torch.bfloat16)
                kk = torch.randn(B, 1, S, 128, device="cuda", dtype=torch.bfloat16)
                vv = torch.randn(B, 1, S, 128, device="cuda", dtype=torch.bfloat16)
                a, la = k08(x.transpose(1, 2), kk, vv, causal=causal, num_splits=c, return_lse=True)
                b2, lb = k08(x.transpose(1, 2).contiguous(), kk, vv, causal=causal, num_splits=c, return_lse=True)
                same = bool(torch.equal(a, b2) and torch.equal(la, lb))
                grid[f"cfg{c}"].setdefault("strided_equal", []).append(same)
                if not same:
                    stamp(f"   FAIL strided q cfg{c} B={B} H={H} S={S} causal={causal}")
    if args.points:
        pts = [(int(d), c == "1", int(s)) for d, c, s in (p.split(":") for p in args.points.split(","))]
    else:
        pts = [(128, c, S) for c in (True, False) for S in (512, 1024, 2048, 4096, 8192)]
    timer = bench.Timer(reps=args.reps, warmup=3, budget_s=2.0)
    cudnn = bench.torch_paths(small=False)["torch.sdpa_cudnn"]
    rows = []
    for D, causal, S in pts:
        H = 32
        B, q, k, v = prefill_qkv(S, D, H=H)
        if args.bshd:  # the same values, laid out as a layer's q projection (a transposed view)
            q = q.transpose(1, 2).contiguous().transpose(1, 2)
        fns = {"two": k08.prepare(q, k, v, causal=causal, num_splits=2)[0],
               "auto": k08.prepare(q, k, v, causal=causal)[0]}
        fns.update({f"cfg{c}": k08.prepare(q, k, v, causal=causal, num_splits=c)[0] for c in cfgs})
        fns.update({t: kv.prepare(q, k, v, causal=causal)[0] for t, kv in variants.items()})
        fns.update({f"{t}.two": kv.prepare(q, k, v, causal=causal, num_splits=2)[0] for t, kv in variants.items()})
        fns["cudnn"] = lambda: cudnn(q, k, v, causal)
        times = timer.side_by_side(fns, reps=args.reps)
        ms = {n: statistics.median(t) for n, t in times.items()}
        x_cudnn = {n: bench.paired_ratio(times["cudnn"], t)["median"] for n, t in times.items() if n != "cudnn"}
        x_auto = {n: bench.paired_ratio(t, times["auto"])["median"] for n, t in times.items() if n != "auto"}
        rows.append(dict(D=D, causal=causal, S=S, B=B, H=H, q_layout="bshd" if args.bshd else "bhsd", ms=ms, x_cudnn=x_cudnn, x_auto=x_auto, reps=args.reps))
        stamp(f"D={D} causal={causal!s:5} S={S:5} B={B:3}{' bshd' if args.bshd else ''}: cudnn {ms['cudnn'] * 1e3:7.1f} us; x cudnn: "
              + " ".join(f"{n} {r:.3f}" for n, r in x_cudnn.items())
              + "; auto over: " + " ".join(f"{n} {r:.3f}" for n, r in x_auto.items()))
        del q, k, v
    write_rows(args.out, args.json, dict(grid=grid, points=rows))


if __name__ == "__main__":
    main()
