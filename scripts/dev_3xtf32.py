"""Develop kernels/09_flash_3xtf32.cu on a GPU: build, check on the prefill grid (and its accumulator-grouping
variants on odd shapes), time against 05_flash_fp32 and PyTorch's fp32 paths on the fp32 suite's points.

    python scripts/dev_3xtf32.py [--out DIR] [--quick]
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
from fastmqa.check import compare  # noqa: E402

from _devcommon import stamp  # noqa: E402
CFGS = (0, 1, 2, 3, 4)  # the accumulator groupings of the .cu's dispatch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    build.extensions_dir()
    new, old = registry.get("09_flash_3xtf32"), registry.get("05_flash_fp32")
    stamp(f"built: {build.build_all([new, old])}")
    log = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    cases = gridcheck.run_grid(new, quick=args.quick)
    log["grid"] = [dataclasses.asdict(c) for c in cases]
    stamp("grid: " + gridcheck.summarize(cases))
    for c in [c for c in cases if not c.ok][:5]:
        print("FAIL", dataclasses.asdict(c), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    bad, worst = 0, {c: 0.0 for c in CFGS}
    for D in (128, 64):
        for causal in (False, True):
            for B, H, Sq, Skv in ((2, 32, 77, 77), (1, 8, 300, 515), (3, 4, 1, 200), (1, 32, 1000, 1000)):
                q, k, v = (torch.randn(B, h, s, D, device="cuda", generator=gen)
                           for h, s in ((H, Sq), (1, Skv), (1, Skv)))
                for cfg in CFGS:
                    run, o, _ = new.prepare(q, k, v, causal=causal, num_splits=cfg)
                    run()
                    r = compare(o, q, k, v, causal=causal)
                    bad += not r.ok
                    worst[cfg] = max(worst[cfg], r.max_err / r.tol)
    log["variants"] = {str(c): w for c, w in worst.items()}
    stamp(f"variants: {bad} failures, worst err/tol by cfg {worst}")
    # tests/test_numerics.py::test_registry_kernel_extreme_scales' cases, for every cfg
    scales = {"inputs x1e6": (1e6, None), "inputs x1e-6": (1e-6, None), "scale 1e-3": (1.0, 1e-3), "scale 1e3": (1.0, 1e3)}
    log["scales"] = []
    for case, (f, scale) in scales.items():
        for D in (64, 128):
            for causal in (False, True):
                g = torch.Generator().manual_seed(3)
                q, k, v = (torch.randn(s, generator=g) * f for s in ((2, 4, 37, D), (2, 1, 70, D), (2, 1, 70, D)))
                q, k, v = q.cuda(), k.cuda(), v.cuda()
                for cfg in CFGS:
                    run, o, _ = new.prepare(q, k, v, causal=causal, scale=scale, num_splits=cfg)
                    run()
                    r = compare(o, q, k, v, causal=causal, scale=scale)
                    log["scales"].append(dict(case=case, D=D, causal=causal, cfg=cfg, ok=r.ok, err=r.max_err, tol=r.tol))
                    if not r.ok:
                        print(f"  {case:13} D={D} causal={causal!s:5} cfg={cfg}: {r}", flush=True)
    for cfg in CFGS:
        w = max(x["err"] / x["tol"] for x in log["scales"] if x["cfg"] == cfg)
        stamp(f"scales cfg {cfg}: worst err/tol {w:.2f}")
    timer = bench.Timer(reps=20, warmup=3, budget_s=1.0)
    rows = []
    pts = [(128, False, S) for S in (128, 256, 512, 1024, 2048, 4096)] + \
          [(128, True, 512), (128, True, 2048), (64, False, 512), (64, False, 2048), (64, True, 2048)]
    if args.quick:
        pts = [(128, False, 512), (128, False, 2048)]
    paths = bench.torch_paths(small=False)
    for D, causal, S in pts:
        B, H = 4, 32
        gen = torch.Generator(device="cuda").manual_seed(S)
        q = torch.randn(B, H, S, D, device="cuda", generator=gen)
        k = torch.randn(B, 1, S, D, device="cuda", generator=gen)
        v = torch.randn(B, 1, S, D, device="cuda", generator=gen)
        fl = bench.attention_flops(B, H, S, S, D, causal)
        r = dict(D=D, causal=causal, S=S, B=B)
        r[new.name] = timer(new.prepare(q, k, v, causal=causal)[0])
        for cfg in CFGS[1:]:
            r[f"09_cfg{cfg}"] = timer(new.prepare(q, k, v, causal=causal, num_splits=cfg)[0])
        r[old.name] = timer(old.prepare(q, k, v, causal=causal)[0])
        for impl in ("torch.sdpa_expanded", "torch.sdpa_efficient"):
            fn = paths[impl]
            r[impl] = timer(lambda: fn(q, k, v, causal))
        rows.append(r)
        tf = {n: fl / ms / 1e9 for n, ms in r.items() if isinstance(ms, float)}
        best = min(r["torch.sdpa_expanded"], r["torch.sdpa_efficient"])
        stamp(f"D={D} causal={causal!s:5} S={S:5}: " + "  ".join(f"{n.replace('torch.', '')} {t:5.1f}" for n, t in tf.items())
              + f"  TFLOP/s; 09 x best torch {best / r[new.name]:.2f}")
        del q, k, v
    log["timing"] = rows
    (out / "tf32_dev.json").write_text(json.dumps(log, indent=1, default=str))


if __name__ == "__main__":
    main()
