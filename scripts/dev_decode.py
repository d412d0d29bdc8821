"""Develop kernels/10_decode.cu and 11_decode_mla.cu on a GPU in one go: build, check, time.

    python scripts/dev_decode.py [--out DIR] [--skip-sanitizer]

1. builds 10_decode, variants of it (-D knobs in the .cu) and 11_decode_mla, in parallel;
2. checks them on ragged caches (lengths 0, 1, non-multiples of the tile; the cache past each
   length poisoned with NaN, the output poisoned before the launch) for every dtype, head dim
   (576 also with k and v the same tensor, as MLA uses it), causal and not, several split counts,
   plus fastmqa.gridcheck's decode grid; the log-sum-exp against float64 too;
3. times them against torch SDPA (every backend that runs) and a device copy of the same K/V bytes,
   on the grid B in {1, 4, 16, 64} x S in {1k, 4k, 16k, 32k} (bf16, H = 32, D = 128, Sq = 1), with
   the L2 flushed before every repetition (fastmqa.bench.Timer), plus a split-count sweep;
4. times MLA-shaped decoding (D = 576, k and v the same latent tensor) against a copy;
5. runs compute-sanitizer memcheck and racecheck on a small case (reports under DIR).
`--profile B S [--splits N]` only runs that decode shape a few times (for ncu).
Everything goes to DIR/decode_dev.json (after each section) and a table at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastmqa import bench, build, gridcheck  # noqa: E402
from fastmqa import kernels as registry  # noqa: E402
from fastmqa.check import compare  # noqa: E402
from fastmqa.reference import attention_ref  # noqa: E402

from _devcommon import stamp  # noqa: E402
# Variants of 10_decode's defaults (16-byte cp.async, 8 warps, 3 stages): the first version
# (4 warps, 4 stages), the bulk copy engine, 4 stages, and the combine's switches. (Session 7's
# cluster-combine, 2-CTA, L2-hint, K/V copy-order,
# tile-rotation and L2-prefetch knobs were measured and removed: results/decode_cluster_dev.json.)
VARIANTS = {"w4s4": ["FASTMQA_DECODE_WARPS=4", "FASTMQA_DECODE_STAGES=4"], "bulk": ["FASTMQA_DECODE_BULK=1"],
            "s4": ["FASTMQA_DECODE_STAGES=4"], "fuse0": ["FASTMQA_DECODE_FUSE=0"],
            "fuse8": ["FASTMQA_DECODE_FUSE=8"], "fuse16": ["FASTMQA_DECODE_FUSE=16"]}
GRID = [(B, S) for B in (1, 4, 16, 64) for S in (1024, 4096, 16384, 32768)]
SWEEP = [(1, 4096), (1, 32768), (4, 32768), (16, 4096), (64, 4096)]
SPLITS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)


def build_all(variants=tuple(VARIANTS)):
    build.extensions_dir()
    base, mla = registry.get("10_decode"), registry.get("11_decode_mla")
    with ThreadPoolExecutor(2 + len(variants)) as pool:
        fb = pool.submit(base.module)
        fm = pool.submit(mla.module)
        fv = {t: pool.submit(build.load_variant, base, t, VARIANTS[t]) for t in variants}
        fb.result()
        fm.result()
        kerns = {"10_decode": base, "11_decode_mla": mla}
        for t, f in fv.items():
            try:
                kerns[f"10_decode_{t}"] = f.result()
            except Exception as e:  # a variant that fails to build is reported, not fatal
                stamp(f"variant {t} failed to build: {e}")
    return kerns


# -- correctness ---------------------------------------------------------------------------
# (B, H, Sq, Smax, lens): M = H*Sq of 1, 32, 64, 96, 256 rows; lengths 0, 1, tile +- 1, Smax.
CASES = [
    (1, 32, 1, 1, [1]),
    (3, 32, 1, 300, [0, 1, 300]),
    (4, 8, 3, 1000, [1000, 999, 517, 64]),
    (2, 32, 8, 700, [700, 5]),
    (5, 16, 4, 2049, [2049, 8, 1500, 129, 33]),
    (2, 1, 1, 4097, [4097, 65]),
    (1, 32, 1, 20000, [19999]),
]


def poisoned(t, lens):
    """A copy of the cache with NaN past each sequence's length (real caches hold garbage there)."""
    p = t.clone()
    for b, L in enumerate(lens):
        p[b, :, L:] = float("nan")
    return p


def check_kernels(kerns, log):
    res = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for D in (64, 128, 576):
            for B, H, Sq, S, lens in CASES:
                for causal in (False, True):
                    for kv_same in ((False, True) if D == 576 else (False,)):
                        q = torch.randn(B, H, Sq, D, device="cuda", dtype=dtype, generator=gen)
                        k = torch.randn(B, 1, S, D, device="cuda", dtype=dtype, generator=gen)
                        v = k if kv_same else torch.randn(B, 1, S, D, device="cuda", dtype=dtype, generator=gen)
                        sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
                        kp = poisoned(k, lens)
                        vp = kp if kv_same else poisoned(v, lens)
                        ref, lse_ref = attention_ref(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                                     causal=causal, seqlens=sl.cpu(), return_lse=True)
                        tout = attention_ref(q, k, v, causal=causal, seqlens=sl)
                        for name, kern in kerns.items():
                            if kern.supports(dtype, D, causal, Sq) is not None:
                                continue
                            for ns in ((0, 1, 2, 5, 16, 64) if name in ("10_decode", "11_decode_mla") or "fuse" in name else (0,)):
                                row = dict(kernel=name, dtype=str(dtype)[6:], B=B, H=H, Sq=Sq, S=S, D=D,
                                           causal=causal, kv_same=kv_same, num_splits=ns)
                                try:
                                    launch, o, lse = kern.prepare(q, kp, vp, causal=causal, cache_seqlens=sl,
                                                                  num_splits=ns, return_lse=True)
                                    o.fill_(float("nan"))
                                    lse.fill_(float("nan"))
                                    launch()
                                    torch.cuda.synchronize()
                                    r = compare(o, q, k, v, causal=causal, seqlens=sl, torch_out=tout, ref=ref)
                                    lse64 = lse.double().cpu()
                                    inf_ok = torch.equal(torch.isneginf(lse64), torch.isneginf(lse_ref))
                                    fin = torch.isfinite(lse_ref)
                                    lse_err = float((lse64[fin] - lse_ref[fin]).abs().max()) if fin.any() else 0.0
                                    ok = r.ok and inf_ok and lse_err < 1e-3
                                    row.update(ok=ok, err=r.max_err, tol=r.tol, lse_err=lse_err, lse_inf_ok=inf_ok,
                                               nan=r.nan, where=r.where)
                                except Exception as e:
                                    row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
                                res.append(row)
                                if not row["ok"]:
                                    print("FAIL", row, flush=True)
    log["checks"] = res
    bad = [r for r in res if not r["ok"]]
    stamp(f"own checks: {len(res) - len(bad)}/{len(res)} pass")
    grid = gridcheck.run_grid(registry.get("10_decode")) + gridcheck.run_grid(registry.get("11_decode_mla"))
    log["gridcheck"] = [dataclasses.asdict(c) for c in grid]
    stamp("gridcheck (10_decode, 11_decode_mla): " + gridcheck.summarize(grid))
    return not bad and all(c.ok for c in grid)


# -- timing --------------------------------------------------------------------------------
H, D, DTYPE = 32, 128, torch.bfloat16  # the timing grid's shape: bf16, 32 heads, one token


def decode_inputs(B, S):
    """q (B, H, 1, D); k, v (B, 1, S, D) as views of one (2, B, 1, S, D) buffer; full lengths."""
    gen = torch.Generator(device="cuda").manual_seed(B * S)
    q = torch.randn(B, H, 1, D, device="cuda", dtype=DTYPE, generator=gen)
    kv = torch.randn(2, B, 1, S, D, device="cuda", dtype=DTYPE, generator=gen)
    return q, kv, torch.full((B,), S, dtype=torch.int32, device="cuda")


def time_grid(kerns, log, timer):
    rows = []
    for B, S in GRID:
        q, kv, lens = decode_inputs(B, S)
        k, v = kv[0], kv[1]
        kvd = torch.empty_like(kv)
        kd, vd = torch.empty_like(k), torch.empty_like(v)
        kv_bytes = kv.numel() * 2
        row = dict(B=B, S=S, kv_bytes=kv_bytes)
        row["copy1_ms"] = timer(lambda: kvd.copy_(kv))                    # one copy kernel, same bytes
        row["copy2_ms"] = timer(lambda: (kd.copy_(k), vd.copy_(v)))       # as fastmqa.bench does
        for name, kern in kerns.items():
            if kern.supports(DTYPE, D, False, 1) is None:
                row[name] = timer(kern.prepare(q, k, v, cache_seqlens=lens)[0])
        sdpa = {}
        for impl, fn in bench.torch_paths(small=False).items():
            if bench._first_working(fn, q, k, v, False) is None:
                sdpa[impl] = timer(lambda: fn(q, k, v, False))
        row["sdpa"] = sdpa
        rows.append(row)
        best = min(sdpa, key=sdpa.get) if sdpa else None
        ours = row["10_decode"]
        stamp(f"B={B:3d} S={S:6d}: ours {ours * 1e3:8.1f} us {kv_bytes / ours / 1e6:7.0f} GB/s | "
              + " ".join(f"{n[-5:]} {kv_bytes / row[n] / 1e6:6.0f}" for n in kerns if n != "10_decode" and n in row)
              + f" | sdpa best {best} {kv_bytes / sdpa[best] / 1e6 if best else 0:6.0f} GB/s"
              + f" | copy1 {row['copy1_ms'] * 1e3:7.1f} us copy2 {row['copy2_ms'] * 1e3:7.1f} us")
        del q, kv, k, v, kvd, kd, vd
        torch.cuda.empty_cache()
    log["grid"] = rows


def time_sweep(kern, log, timer, points=None):
    rows = []
    for B, S in points or SWEEP:
        q, kv, lens = decode_inputs(B, S)
        k, v = kv[0], kv[1]
        kv_bytes = kv.numel() * 2
        line = []
        for ns in (0,) + SPLITS:
            ms = timer(kern.prepare(q, k, v, cache_seqlens=lens, num_splits=ns)[0])
            rows.append(dict(B=B, S=S, num_splits=ns, ms=ms, gbps=kv_bytes / ms / 1e6))
            line.append(f"{ns}:{kv_bytes / ms / 1e6:.0f}")
        stamp(f"sweep B={B} S={S} (splits:GB/s, 0 = auto): " + " ".join(line))
    log["sweep"] = rows


def time_mla(kern, log, timer):
    """MLA: the (B, S, 576) latent cache is both k and v; bandwidth counts it once."""
    rows = []
    for H, B, S in ((16, 1, 16384), (16, 16, 4096), (16, 64, 4096), (16, 64, 16384), (128, 16, 4096)):
        gen = torch.Generator(device="cuda").manual_seed(B * S + H)
        q = torch.randn(B, H, 1, 576, device="cuda", dtype=torch.bfloat16, generator=gen)
        c = torch.randn(B, 1, S, 576, device="cuda", dtype=torch.bfloat16, generator=gen)
        cd = torch.empty_like(c)
        lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
        nbytes = c.numel() * 2
        ms = timer(kern.prepare(q, c, c, cache_seqlens=lens, scale=192 ** -0.5)[0])
        copy_ms = timer(lambda: cd.copy_(c))
        rows.append(dict(H=H, B=B, S=S, bytes=nbytes, ms=ms, copy_ms=copy_ms, gbps=nbytes / ms / 1e6))
        stamp(f"MLA H={H} B={B} S={S}: {ms * 1e3:.1f} us {nbytes / ms / 1e6:.0f} GB/s (copy of the latent {copy_ms * 1e3:.1f} us)")
        del q, c, cd
    log["mla"] = rows


def sanitize(tool, name, out):
    """compute-sanitizer on fastmqa.gpucheck's small decode case; the whole report goes to a file."""
    import subprocess
    cmd = ["compute-sanitizer", "--tool", tool, "--error-exitcode", "9", "--print-limit", "20", sys.executable,
           "-m", "fastmqa.gpucheck", "--child", name]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=Path(__file__).resolve().parent.parent)
    (out / f"{tool}_{name[:2]}.txt").write_text(p.stdout + p.stderr)
    summ = [l for l in (p.stdout + p.stderr).splitlines() if "SUMMARY" in l]
    return dict(tool=tool, kernel=name, rc=p.returncode, summary=summ)


def profile(B, S, splits=0, impl="10_decode"):
    q, kv, lens = decode_inputs(B, S)
    if impl.startswith("torch."):  # one of PyTorch's paths (fastmqa.bench.torch_paths), to compare
        fn = bench.torch_paths(small=False)[impl]
        launch = lambda: fn(q, kv[0], kv[1], False)  # noqa: E731
    else:
        _, _, tag = impl.partition("10_decode_")
        kern = build.load_variant(registry.get("10_decode"), tag, VARIANTS[tag]) if tag else registry.get(impl)
        launch = kern.prepare(q, kv[0], kv[1], cache_seqlens=lens, num_splits=splits)[0]
    for _ in range(8):
        launch()
    torch.cuda.synchronize()


def summary(log):
    cp = log["ceilings"]["copy_gbps"]
    print(f"\ncopy ceiling {cp:.0f} GB/s (read + written); ratios: ours GB/s / copy GB/s, time vs 1-kernel copy, vs best SDPA")
    print(f"{'B':>3} {'S':>6} {'KV MB':>7} {'ours us':>8} {'GB/s':>6} {'/copy':>6} {'t/copy1':>7} {'SDPA GB/s':>9} {'x SDPA':>6}")
    for r in log["grid"]:
        ours, kvb = r["10_decode"], r["kv_bytes"]
        best = min(r["sdpa"].values()) if r["sdpa"] else float("nan")
        print(f"{r['B']:>3} {r['S']:>6} {kvb / 2**20:7.0f} {ours * 1e3:8.1f} {kvb / ours / 1e6:6.0f} "
              f"{kvb / ours / 1e6 / cp:6.2f} {ours / r['copy1_ms']:7.2f} {kvb / best / 1e6:9.0f} {best / ours:6.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-sanitizer", action="store_true")
    ap.add_argument("--profile", nargs=2, type=int, metavar=("B", "S"))
    ap.add_argument("--splits", type=int, default=0, help="with --profile: force the split count (0 = choose)")
    ap.add_argument("--impl", default="10_decode", help="with --profile: a registry kernel or a torch path (torch.sdpa_flash)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated VARIANTS to build and time")
    ap.add_argument("--skip-mla", action="store_true", help="leave out the MLA timings")
    ap.add_argument("--sweep-only", default=None, metavar="B:S,...",
                    help="only the split-count sweep, at these points (no variants, checks or grid)")
    args = ap.parse_args()
    if args.profile:
        return profile(*args.profile, splits=args.splits, impl=args.impl)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "sm_count": torch.cuda.get_device_properties(0).multi_processor_count}

    def save():
        (out / "decode_dev.json").write_text(json.dumps(log, indent=1, default=str))

    if args.sweep_only:
        points = [tuple(int(x) for x in pt.split(":")) for pt in args.sweep_only.split(",")]
        base = registry.get("10_decode")
        base.module()
        timer = bench.Timer(reps=30, warmup=3, budget_s=0.5)
        time_sweep(base, log, timer, points)
        (out / "decode_sweep_dev.json").write_text(json.dumps(log, indent=1, default=str))
        return 0
    kerns = build_all([v for v in args.variants.split(",") if v])
    stamp(f"built {', '.join(kerns)}")
    log["checks_ok"] = check_kernels(kerns, log)
    save()
    timer = bench.Timer(reps=30, warmup=3, budget_s=0.5)
    log["ceilings"] = bench.measure_ceilings(timer)
    stamp(f"ceilings {log['ceilings']}")
    time_grid(kerns, log, timer)
    save()
    time_sweep(kerns["10_decode"], log, timer)
    save()
    if not args.skip_mla:
        time_mla(kerns["11_decode_mla"], log, timer)
        save()
    summary(log)
    if not args.skip_sanitizer:
        for name in ("10_decode", "11_decode_mla"):
            for tool in ("memcheck", "racecheck"):
                r = sanitize(tool, name, out)
                log.setdefault("sanitizer", []).append(r)
                stamp(f"{name} {tool}: rc {r['rc']} {r['summary']}")
        save()
    return 0 if log["checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
