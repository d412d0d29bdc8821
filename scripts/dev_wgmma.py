"""Develop kernels/08_flash_wgmma.cu on a GPU: build, check on the prefill grid, time against
06_flash_mma and SDPA (every backend that runs) on the prefill suite's points.

    python scripts/dev_wgmma.py [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastmqa import bench, build, gridcheck  # noqa: E402
from fastmqa import kernels as registry  # noqa: E402

from _devcommon import prefill_qkv, stamp  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cfgs", default=None, help="comma-separated cfgs (p.num_splits) to check and time at both "
                                                  "head dims (default: 1 at D=128, 1,2,3 at D=64)")
    ap.add_argument("--json", default="wgmma_dev.json", help="file name under --out")
    args = ap.parse_args()
    cfgs_for = (lambda D: tuple(int(c) for c in args.cfgs.split(","))) if args.cfgs else \
        (lambda D: (1,) if D == 128 else (1, 2, 3))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    build.extensions_dir()
    new, old = registry.get("08_flash_wgmma"), registry.get("06_flash_mma")
    errs = build.build_all([new, old])
    stamp(f"built: {errs}")
    log = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    cases = gridcheck.run_grid(new, quick=args.quick)
    log["grid"] = [dataclasses.asdict(c) for c in cases]
    stamp("grid: " + gridcheck.summarize(cases))
    for c in cases:
        if not c.ok:
            print("FAIL", dataclasses.asdict(c), flush=True)
            break
    if args.cfgs:  # the whole shape grid for each cfg asked for
        import functools
        for cfg in cfgs_for(128):
            cc = gridcheck.run_grid(new, fn=functools.partial(new, num_splits=cfg))
            log[f"grid_cfg{cfg}"] = [dataclasses.asdict(c) for c in cc]
            stamp(f"grid cfg {cfg}: " + gridcheck.summarize(cc))
    # the tile-shape variants (num_splits = cfg, see by_dim in the .cu) on a few odd shapes
    from fastmqa.check import compare
    gen = torch.Generator(device="cuda").manual_seed(1)
    bad = 0
    for D, cfgs in ((128, cfgs_for(128)), (64, cfgs_for(64))):
        for causal in (False, True):
            for B, H, Sq, Skv in ((2, 32, 77, 77), (1, 8, 300, 515), (3, 4, 1, 200), (1, 32, 1000, 1000)):
                q = torch.randn(B, H, Sq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                k = torch.randn(B, 1, Skv, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                v = torch.randn(B, 1, Skv, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                for cfg in cfgs:
                    run, o, _ = new.prepare(q, k, v, causal=causal, num_splits=cfg)
                    run()
                    r = compare(o, q, k, v, causal=causal)
                    bad += not r.ok
                    if not r.ok:
                        print("FAIL cfg", cfg, D, causal, B, H, Sq, Skv, r, flush=True)
    stamp(f"variants: {bad} failures")
    timer = bench.Timer(reps=20, warmup=3, budget_s=1.0)
    rows = []
    pts = [(D, causal, S) for D in (128, 64) for causal in (False, True) for S in (512, 2048, 8192, 16384)]
    if args.quick:
        pts = [(128, False, 2048), (128, True, 8192), (64, False, 2048)]
    for D, causal, S in pts:
        H = 32
        B, q, k, v = prefill_qkv(S, D, H=H)
        fl = bench.attention_flops(B, H, S, S, D, causal)
        r = dict(D=D, causal=causal, S=S, B=B)
        for kern in (new, old):
            r[kern.name] = timer(kern.prepare(q, k, v, causal=causal)[0])
        for cfg in cfgs_for(D):
            r[f"08_cfg{cfg}"] = timer(new.prepare(q, k, v, causal=causal, num_splits=cfg)[0])
        for impl, fn in bench.torch_paths(small=False).items():
            if impl in ("torch.sdpa_expanded", "torch.sdpa_efficient", "torch.sdpa_math") or bench._first_working(fn, q, k, v, causal):
                continue
            r[impl] = timer(lambda: fn(q, k, v, causal))
        rows.append(r)
        tf = {n: fl / ms / 1e9 for n, ms in r.items() if isinstance(ms, float)}
        stamp(f"D={D} causal={causal!s:5} S={S:5}: " + "  ".join(f"{n.replace('torch.', '')} {t:5.0f}" for n, t in tf.items())
              + "  TFLOP/s")
        del q, k, v
    log["timing"] = rows
    (out / args.json).write_text(json.dumps(log, indent=1, default=str))


if __name__ == "__main__":
    main()
