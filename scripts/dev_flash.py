"""Develop kernels 05_flash_fp32 and 06_flash_mma on a GPU host: build, check, time, in one call.

    python scripts/dev_flash.py [--quick] [--no-time] [--out DIR]

1. builds both kernels (fastmqa.build.build_all);
2. checks them over a grid against the float64 reference (computed on the GPU in float64) with
   the tolerance rule of fastmqa.check: B 1-2, H 1/3/4/32, Sq/Skv in {1, 17, 64, 129, 257, 1000}
   with Sq != Skv both ways, D 64/128, causal and not, each dtype; plus the log-sum-exp;
3. times them (CUDA events, median) at the target shapes next to PyTorch's SDPA in the same run:
   fp32 B=4 H=32 S=512 D=128 for 05; bf16 H=32, B*S=16384, S 512..16384, D 128/64, causal and not
   for 06 against SDPA's FLASH_ATTENTION and CUDNN_ATTENTION backends with K/V expanded to H heads.
Prints a table per part and writes dev_flash.json (and the log) to --out ($OUT if set).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
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

SHAPES = [  # (B, H, Sq, Skv)
    (1, 1, 1, 1), (2, 4, 17, 17), (1, 32, 64, 64), (2, 4, 129, 129), (1, 1, 257, 257), (2, 32, 1000, 1000),
    (1, 4, 1, 1000), (2, 4, 17, 257), (1, 32, 64, 129), (1, 4, 257, 64), (2, 1, 1000, 17),
    (1, 32, 129, 1000), (1, 4, 1000, 129), (1, 3, 129, 257), (2, 32, 1, 64), (1, 4, 64, 1),
]
QUICK = [(1, 1, 1, 1), (2, 4, 17, 17), (1, 32, 129, 1000), (1, 4, 1000, 129), (1, 3, 129, 257)]


def check_grid(name, dtypes, shapes, variants=(0,), variant_dtypes=None):
    kern = kernels.get(name)
    rows, n_bad = [], 0
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype in dtypes:
        for D in kern.head_dims:
            for causal in (False, True):
                for (B, H, Sq, Skv) in shapes:
                    q = torch.randn(B, H, Sq, D, device="cuda", generator=gen).to(dtype)
                    k = torch.randn(B, 1, Skv, D, device="cuda", generator=gen).to(dtype)
                    v = torch.randn(B, 1, Skv, D, device="cuda", generator=gen).to(dtype)
                    ref, lse_ref = attention_ref(q.double(), k.double(), v.double(), causal=causal, return_lse=True)
                    for var in variants:
                        if var and variant_dtypes and dtype not in variant_dtypes:
                            continue
                        if name == "06_flash_mma" and var % 10 in (2, 3) and D != 64:
                            continue
                        tag = f"{name} v{var} {str(dtype)[6:]} D={D} causal={causal:d} B={B} H={H} Sq={Sq} Skv={Skv}"
                        try:
                            launch, o, lse = kern.prepare(q, k, v, causal=causal, num_splits=var, return_lse=True)
                            o.fill_(float("nan"))  # poison: every element must be written
                            lse.fill_(float("nan"))
                            launch()
                            torch.cuda.synchronize()
                            r = compare(o, q, k, v, causal=causal, ref=ref.cpu())
                            lse_ok, lse_err = lse_check(lse, lse_ref, 1e-4 if dtype == torch.float32 else 2e-2)
                            ok = r.ok and lse_ok
                            msg = f"{r}; lse err {lse_err:.2e}{'' if lse_ok else ' LSE FAIL'}"
                            if not r.ok and not r.nan:
                                diff = (o.double().cpu() - ref.cpu()).abs()
                                bad = (diff > r.tol).nonzero()
                                msg += (f"; {bad.shape[0]} bad of {diff.numel()}; first bad (b,h,i,d) "
                                        f"{bad[:4].tolist()}; bad i range {int(bad[:, 2].min())}..{int(bad[:, 2].max())}"
                                        f", h range {int(bad[:, 1].min())}..{int(bad[:, 1].max())}"
                                        f", d set {sorted(set(bad[:, 3].tolist()))[:20]}")
                            elif r.nan:
                                nanm = torch.isnan(o)
                                idx = nanm.nonzero()
                                msg += f"; {int(nanm.sum())} NaN; first {idx[:4].tolist()}"
                        except Exception as e:  # report every failure
                            ok, msg = False, f"{type(e).__name__}: {str(e)[:300]}"
                            r = None
                        n_bad += not ok
                        rows.append(dict(case=tag, ok=ok, msg=msg))
                        if not ok:
                            print("FAIL", tag, msg, flush=True)
    print(f"{name}: {len(rows) - n_bad}/{len(rows)} cases pass", flush=True)
    return rows


def timer(fn, reps=20, warm_ms=40.0):
    """Median of CUDA-event times after a warm-up of at least warm_ms (clocks settle first)."""
    t0 = time.perf_counter()
    n_warm = 0
    while n_warm < 3 or (time.perf_counter() - t0) * 1e3 < warm_ms:
        fn()
        torch.cuda.synchronize()
        n_warm += 1
    one = (time.perf_counter() - t0) / n_warm
    return event_median_ms(fn, max(5, min(reps, int(1.0 / max(one, 1e-6)))))


def torch_fns():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def mk(backend, expanded):
        def fn(q, k, v, causal):
            H = q.shape[1]
            kk, vv = (k.expand(-1, H, -1, -1), v.expand(-1, H, -1, -1)) if expanded else (k, v)
            ctx = sdpa_kernel([backend]) if backend is not None else _null()
            with ctx:
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=not expanded)
        return fn

    return {"torch.sdpa_flash": mk(SDPBackend.FLASH_ATTENTION, True),
            "torch.sdpa_flash_gqa": mk(SDPBackend.FLASH_ATTENTION, False),
            "torch.sdpa_cudnn": mk(SDPBackend.CUDNN_ATTENTION, True),
            "torch.sdpa_efficient": mk(SDPBackend.EFFICIENT_ATTENTION, True),
            "torch.sdpa_default": mk(None, True)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def time_point(results, impls, dtype, B, H, S, D, causal, ours):
    gen = torch.Generator(device="cuda").manual_seed(S)
    q = torch.randn(B, H, S, D, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(B, 1, S, D, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(B, 1, S, D, device="cuda", dtype=dtype, generator=gen)
    fl = attention_flops(B, H, S, S, D, causal)
    fns = {}
    for label, (name, var) in ours.items():
        try:
            fns[label] = kernels.get(name).prepare(q, k, v, causal=causal, num_splits=var)[0]
        except Exception as e:
            print(f"  {label}: {type(e).__name__}: {str(e)[:200]}")
    tf = torch_fns()
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    for impl in impls:
        try:
            tf[impl](q, k, v, causal)
            torch.cuda.synchronize()
            fns[impl] = (lambda f: (lambda: f(q, k, v, causal)))(tf[impl])
        except Exception as e:
            print(f"  {impl} D={D} S={S} causal={causal}: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
    line = {}
    for _ in range(2):  # two passes, alternating order; keep each one's faster median
        for label in (list(fns) if _ == 0 else list(fns)[::-1]):
            ms = timer(fns[label])
            line[label] = min(ms, line.get(label, float("inf")))
    line = {k: line[k] for k in fns}
    torch.backends.cuda.matmul.allow_tf32 = prev
    for impl, ms in line.items():
        results.append(dict(impl=impl, dtype=str(dtype)[6:], B=B, H=H, Sq=S, Skv=S, D=D, causal=causal,
                            ms=round(ms, 5), tflops=round(fl / ms / 1e9, 2)))
    return line, fl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--v05", default="0,1,2,3,4", help="05 variants (num_splits) to check and time")
    ap.add_argument("--v06", default="0,10,1,2,3,11,12,13", help="06 variants (10*slow+cfg, bf16) to check and time")
    ap.add_argument("--v06-seqs", default="512,1024,4096,16384", help="S at which 06 variants are timed")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(torch.cuda.get_device_name(0), torch.__version__, torch.version.cuda, flush=True)
    t0 = time.time()
    errs = build_all([kernels.get("05_flash_fp32"), kernels.get("06_flash_mma")], max_workers=2)
    print(f"build: {time.time() - t0:.0f} s", {k: (str(v)[-3000:] if v else None) for k, v in errs.items()}, flush=True)
    report = dict(device=torch.cuda.get_device_name(0), build={k: str(v)[-3000:] if v else None for k, v in errs.items()})
    shapes = QUICK if args.quick else SHAPES
    v05 = [int(x) for x in args.v05.split(",")]
    v06 = [int(x) for x in args.v06.split(",")]
    v06_seqs = [int(x) for x in args.v06_seqs.split(",")]
    if not args.no_check:
        t0 = time.time()
        report["check"] = []
        if errs.get("05_flash_fp32") is None:
            report["check"] += check_grid("05_flash_fp32", (torch.float32,), shapes, variants=v05)
        if errs.get("06_flash_mma") is None:
            report["check"] += check_grid("06_flash_mma", (torch.bfloat16, torch.float16), shapes, variants=v06,
                                          variant_dtypes=(torch.bfloat16,))
        print(f"check: {time.time() - t0:.0f} s", flush=True)
    if not args.no_time:
        res = []
        if errs.get("05_flash_fp32") is None:
            print("\nfp32 (05_flash_fp32 vs torch), ms and TFLOP/s")
            for (S, causal) in ((512, False), (512, True), (2048, False)):
                line, fl = time_point(res, ("torch.sdpa_default", "torch.sdpa_efficient"), torch.float32, 4, 32, S, 128,
                                      causal, {f"05v{x}": ("05_flash_fp32", x) for x in v05})
                best = min((ms for k, ms in line.items() if k.startswith("torch")), default=float("nan"))
                print(f"  S={S:5} causal={causal:d} " + "  ".join(f"{k}={ms * 1e3:.0f}us/{fl / ms / 1e9:.1f}TF" for k, ms in line.items())
                      + f"  best 05 / best torch {best / min(ms for k, ms in line.items() if k.startswith('05')):.2f}", flush=True)
        if errs.get("06_flash_mma") is None:
            print("\nbf16 H=32 B*S=16384 (06_flash_mma vs torch), TFLOP/s")
            seqs = (512, 2048, 8192) if args.quick else (512, 1024, 2048, 4096, 8192, 16384)
            for D in (128, 64):
                for causal in (False, True):
                    for S in seqs:
                        ours = {"06": ("06_flash_mma", 0)}
                        if S in v06_seqs:
                            ours.update({f"06v{x}": ("06_flash_mma", x) for x in v06
                                         if x and (D == 64 or x % 10 == 0)})
                        line, fl = time_point(res, ("torch.sdpa_flash", "torch.sdpa_cudnn"),
                                              torch.bfloat16, 16384 // S, 32, S, D, causal, ours)
                        tf = {k: fl / ms / 1e9 for k, ms in line.items()}
                        fa = tf.get("torch.sdpa_flash", float("nan"))
                        best06 = max(x for k, x in tf.items() if k.startswith("06"))
                        print(f"  D={D:3} causal={causal:d} S={S:5} " + " ".join(f"{k}={x:.0f}" for k, x in tf.items())
                              + f"  06/flash={tf.get('06', 0) / fa:.2f} best06/flash={best06 / fa:.2f}"
                              f" 06/cudnn={tf.get('06', 0) / tf.get('torch.sdpa_cudnn', float('nan')):.2f}", flush=True)
        report["timing"] = res
    (out / "dev_flash.json").write_text(json.dumps(report, indent=1))
    print("wrote", out / "dev_flash.json")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
