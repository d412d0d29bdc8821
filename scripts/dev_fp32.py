"""Develop the fp32 chapters' kernels (01_naive .. 04_cublas) on a GPU host, in one call.

    python scripts/dev_fp32.py [--no-check] [--no-time] [--ncu] [--out DIR]

1. builds 01_naive, 02_smem_tiled, 03_warp_shuffle, 04_cublas (fastmqa.build.build_all);
2. checks each over a grid with the tolerance rule of fastmqa.check (float64 reference computed
   on the GPU): B in {1, 2}, H in {1, 4, 32}, Sq and Skv each in {1, 17, 64, 129, 512} (so
   Sq != Skv both ways), D 64 and 128, causal and not; outputs are poisoned with NaN first, so
   every element must be written; the log-sum-exp is checked too where a kernel returns it;
3. times each at the seed shape fp32 B=4 H=32 S=512 D=128 (CUDA events, median of 20 after
   warm-up) next to PyTorch in the same run (TF32 off);
4. with --ncu, runs `python -m fastmqa.profile` (Nsight Compute) over the four kernels.
Writes dev_fp32.json (and ncu.json) to --out ($OUT if set).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastmqa import kernels  # noqa: E402
from fastmqa.bench import attention_flops  # noqa: E402
from fastmqa.build import build_all  # noqa: E402
from fastmqa.check import compare  # noqa: E402
from fastmqa.reference import attention_ref  # noqa: E402

from _devcommon import event_median_ms, lse_check  # noqa: E402

NAMES = ["01_naive", "02_smem_tiled", "03_warp_shuffle", "04_cublas"]
SEQS = [1, 17, 64, 129, 512]


def check_grid(names):
    """Every (B, H, Sq, Skv, D, causal) of the grid, all kernels on the same inputs."""
    stats = {n: dict(cases=0, bad=0, worst=0.0, failures=[]) for n in names}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for B, H, Sq, Skv, D, causal in itertools.product((1, 2), (1, 4, 32), SEQS, SEQS, (64, 128), (False, True)):
        q = torch.randn(B, H, Sq, D, device="cuda", generator=gen)
        k = torch.randn(B, 1, Skv, D, device="cuda", generator=gen)
        v = torch.randn(B, 1, Skv, D, device="cuda", generator=gen)
        ref, lse_ref = attention_ref(q.double(), k.double(), v.double(), causal=causal, return_lse=True)
        ref_cpu = ref.cpu()
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch_out = attention_ref(q, k, v, causal=causal)
        torch.backends.cuda.matmul.allow_tf32 = prev
        for n in names:
            kern = kernels.get(n)
            st = stats[n]
            st["cases"] += 1
            tag = f"B={B} H={H} Sq={Sq} Skv={Skv} D={D} causal={int(causal)}"
            try:
                launch, o, lse = kern.prepare(q, k, v, causal=causal, return_lse=kern.returns_lse)
                o.fill_(float("nan"))
                lse.fill_(float("nan"))
                launch()
                torch.cuda.synchronize()
                r = compare(o, q, k, v, causal=causal, ref=ref_cpu, torch_out=torch_out)
                ok, msg = r.ok, str(r)
                if r.tol > 0:
                    st["worst"] = max(st["worst"], r.max_err / r.tol)
                if kern.returns_lse:
                    lse_ok, lse_err = lse_check(lse, lse_ref, 1e-4)
                    ok = ok and lse_ok
                    msg += f"; lse err {lse_err:.1e}" + ("" if lse_ok else " LSE FAIL")
                if not r.ok and not r.nan:
                    msg += f"; worst (b,h,i,d) {r.where}"
            except Exception as e:  # a crash is a failure of that case
                ok, msg = False, f"{type(e).__name__}: {str(e)[:300]}"
            if not ok:
                st["bad"] += 1
                if len(st["failures"]) < 12:
                    st["failures"].append(f"{tag}: {msg}")
                print(f"FAIL {n} {tag}: {msg}", flush=True)
    for n in names:
        s = stats[n]
        print(f"{n}: {s['cases'] - s['bad']}/{s['cases']} cases pass, worst error {s['worst']:.2f}x of tolerance",
              flush=True)
    return stats


def timer(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return event_median_ms(fn, reps)


def time_seed(names, causal=False, B=4, H=32, S=512, D=128):
    gen = torch.Generator(device="cuda").manual_seed(S)
    q = torch.randn(B, H, S, D, device="cuda", generator=gen)
    k = torch.randn(B, 1, S, D, device="cuda", generator=gen)
    v = torch.randn(B, 1, S, D, device="cuda", generator=gen)
    fl = attention_flops(B, H, S, S, D, causal)
    rows = []
    for n in names:
        launch = kernels.get(n).prepare(q, k, v, causal=causal)[0]
        rows.append((n, timer(launch, reps=20 if n != "01_naive" else 5, warmup=3 if n != "01_naive" else 1)))
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    H_ = q.shape[1]
    torch_fns = {
        "torch.sdpa_expanded": lambda: F.scaled_dot_product_attention(q, k.expand(-1, H_, -1, -1), v.expand(-1, H_, -1, -1), is_causal=causal),
        "torch.sdpa_gqa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True),
        "torch.matmul_softmax": lambda: attention_ref(q, k, v, causal=causal),
    }
    for n, fn in torch_fns.items():
        try:
            fn()
            torch.cuda.synchronize()
            rows.append((n, timer(fn)))
        except Exception as e:
            print(f"  {n}: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
    torch.backends.cuda.matmul.allow_tf32 = prev
    out = []
    print(f"seed shape fp32 B={B} H={H} S={S} D={D} causal={causal}:")
    prev_ms = None
    for n, ms in rows:
        ratio = f"  {prev_ms / ms:5.2f}x vs previous" if prev_ms and not n.startswith("torch") else ""
        print(f"  {n:22s} {ms:10.3f} ms  {fl / ms / 1e9:7.2f} TFLOP/s{ratio}", flush=True)
        if not n.startswith("torch"):
            prev_ms = ms
        out.append(dict(impl=n, dtype="float32", B=B, H=H, Sq=S, Skv=S, D=D, causal=causal,
                        ms=round(ms, 5), tflops=round(fl / ms / 1e9, 3)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--ncu", action="store_true")
    ap.add_argument("--kernels", default=",".join(NAMES))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.kernels.split(",")
    report = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda)
    print(report, flush=True)
    t0 = time.time()
    errs = build_all([kernels.get(n) for n in names], max_workers=len(names))
    report["build"] = {k: (str(v)[-3000:] if v else None) for k, v in errs.items()}
    print(f"build: {time.time() - t0:.0f} s", report["build"], flush=True)
    names = [n for n in names if errs.get(n) is None]

    def save():
        (out / "dev_fp32.json").write_text(json.dumps(report, indent=1) + "\n")

    if not args.no_time:
        report["timing"] = time_seed(names) + time_seed(names, causal=True)
        save()
    if not args.no_check:
        t0 = time.time()
        report["check"] = check_grid(names)
        print(f"check: {time.time() - t0:.0f} s", flush=True)
        save()
    if args.ncu:
        t0 = time.time()
        cmd = [sys.executable, "-m", "fastmqa.profile", "--kernels", ",".join(names), "--out", str(out / "ncu.json")]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        print(res.stdout[-6000:], res.stderr[-3000:], f"ncu: {time.time() - t0:.0f} s", flush=True)
    save()


if __name__ == "__main__":
    main()
