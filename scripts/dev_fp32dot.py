"""Compare ways to sum the fp32 dot product q.k in 01_naive and 02_smem_tiled (kernels/dot.cuh) on a GPU.

    python scripts/dev_fp32dot.py [--out DIR]

Builds each kernel with every FASTMQA_DOT_MODE / FASTMQA_DOT_P variant in parallel, then for each:
the GPU fuzz run (fastmqa.fuzz, seed 0: the cases the GPU check uses), the quick shape grid, and the
time at the original project's shape (fp32, B=4, H=32, S=512, D=128; L2 flushed, median).
Writes DIR/fp32dot_dev.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastmqa import bench, build, gridcheck  # noqa: E402
from fastmqa import kernels as registry  # noqa: E402
from fastmqa.fuzz import fuzz_kernel  # noqa: E402

VARIANTS = {"serial": (2, 16), "p16": (0, 16), "p8": (0, 8), "p4": (0, 4), "chunk16": (1, 16), "chunk8": (1, 8)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    t0 = time.time()
    build.extensions_dir()
    jobs = [(b, t, m, p) for b in ("01_naive", "02_smem_tiled") for t, (m, p) in VARIANTS.items()]
    kerns = {}
    with ThreadPoolExecutor(len(jobs)) as pool:
        futs = {(b, t): pool.submit(build.load_variant, registry.get(b), t,
                                          [f"FASTMQA_DOT_MODE={m}", f"FASTMQA_DOT_P={p}"])
                for b, t, m, p in jobs}
        for key, f in futs.items():
            try:
                kerns[key] = f.result()
            except Exception as e:  # noqa: BLE001
                print(f"{key} failed to build: {str(e)[-2000:]}", flush=True)
    print(f"built {len(kerns)} variants in {time.time() - t0:.0f} s", flush=True)
    timer = bench.Timer()
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(4, 32, 512, 128, device="cuda", generator=g)
    k = torch.randn(4, 1, 512, 128, device="cuda", generator=g)
    v = torch.randn(4, 1, 512, 128, device="cuda", generator=g)
    out = []
    for (b, t), kern in kerns.items():
        fz = fuzz_kernel(kern, examples=25)
        grid = gridcheck.run_grid(kern, quick=True)
        worst = max((c.max_err / c.tol for c in grid if c.tol == c.tol and c.tol > 0), default=0.0)
        ms = timer(kern.prepare(q, k, v)[0])
        rec = dict(kernel=b, variant=t, mode=VARIANTS[t][0], P=VARIANTS[t][1], ms=round(ms, 4),
                   fuzz=f"{fz['passed']}/{fz['total']}", fuzz_failures=[f["error"][:160] for f in fz["failures"]],
                   grid=f"{sum(c.ok for c in grid)}/{len(grid)}", grid_worst_ratio=round(worst, 3))
        out.append(rec)
        print(json.dumps(rec), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fp32dot_dev.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
