"""Would filling the last 4 SMs at B = 64 pay, and which L2 policy should K/V have? (GPU host)

At B = 64 and S >= 16k 10_decode runs 2 splits a sequence: 128 CTAs, one per SM, on 132 SMs. A
stream-K partition (every CTA an equal share of all the key tiles, across sequence boundaries)
would use all 132 SMs: at most 132/128 = 3 % more SMs. Whether they would add bandwidth is measured
without building it: the same kernel on B = 66 (132 CTAs, 3 % more bytes) against B = 64, side by
side with SDPA and the two-kernel copy of K and V. If B = 66 takes 3 % longer, the DRAM is the
bound and stream-K cannot gain; if it takes as long, the idle SMs are. Forced split counts (4:
256 CTAs, 8: 512) show the cost of more, shorter CTAs instead. Every point is timed under the
suite's write flush and under a clean flush (`bench.Timer(clean_flush=True)`).

--variants builds -D variants of 10_decode timed in the same repetitions, e.g. the K/V tiles' L2
policy (FASTMQA_DECODE_KV_EVICT: 0 evict_first, 1 evict_normal; by default chosen by size).

    python scripts/dev_decode_fill.py [--out DIR] [--reps N] [--points B:S,...] [--no-fill]
                                      [--variants TAG:MACRO=V,...] [--name FILE]

Writes DIR/FILE (decode_fill_dev.json): per (flush, B, S, impl) the median us, GB/s of K and V
read, and the paired ratio of its time to the default 10_decode's at the point (vs_ours).

Session 14, H100 (results/decode_fill_dev.json, with `--variants first:FASTMQA_DECODE_KV_EVICT=0,
normal:FASTMQA_DECODE_KV_EVICT=1`): B = 66 takes 1.6-2.2 % longer than B = 64 (3.1 % more bytes)
under the write flush and 3.2-3.9 % under the clean one, so the 4 idle SMs are worth about 1.5 %
at most: stream-K not built. The L2 policy (results/decode_policy_dev.json: the 16 points of the
decode grid, `--no-fill --name decode_policy_dev.json`, same variants): under the write flush
evict_normal is 3-5 % faster than evict_first at 512 MB and 1 GB of K and V, level at 256 MB and
6-12 % slower at 32-128 MB; under the clean flush the two are within 3 % everywhere. 10_decode
now picks evict_normal from 4x L2 (200 MB) up (kv_policy_normal in decode_common.cuh). At the
points under 64 MiB `first` is the default build under another name: their paired ratio (up to
3.5 % apart) is this comparison's resolution there. Two more variants were timed this way and
removed from the kernel (DEVNOTES, session 14): an L2 prefetch of the tiles past the pipeline
(results/decode_l2pf_dev.json: slower) and interleaved splits (results/decode_interleave_dev.json:
within +-4 %, mixed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastmqa import bench, build  # noqa: E402
from fastmqa import kernels as registry  # noqa: E402

from _devcommon import RAGGED_DECODE_CASES, build_with_variants, parse_variants, stamp, write_rows  # noqa: E402

H, D, DT = 32, 128, torch.bfloat16


def point_fns(kerns, B, S, forced, fill):
    """({name: fn}, {name: K+V bytes}, tensors to keep) for one point: every kernel in kerns,
    `forced` split counts of the default, SDPA (enable_gqa; FLASH forced) and the copy of K and V;
    fill: the same for B + 2 (the default, SDPA and the copy)."""
    fns, nbytes, keep = {}, {}, []
    for b in ((B, B + 2) if fill else (B,)):
        g = torch.Generator(device="cuda").manual_seed(b * S)
        q = torch.randn(b, H, 1, D, device="cuda", dtype=DT, generator=g)
        k, v = (torch.randn(b, 1, S, D, device="cuda", dtype=DT, generator=g) for _ in range(2))
        lens = torch.full((b,), S, dtype=torch.int32, device="cuda")
        kd, vd = torch.empty_like(k), torch.empty_like(v)
        keep += [q, k, v, lens, kd, vd]
        here = {}
        for name, kern in (kerns.items() if b == B else [("10_decode", kerns["10_decode"])]):
            here[name] = kern.prepare(q, k, v, cache_seqlens=lens)[0]
        for ns in (forced if b == B else ()):
            here[f"10_decode_s{ns}"] = kerns["10_decode"].prepare(q, k, v, cache_seqlens=lens, num_splits=ns)[0]
        here["sdpa_gqa"] = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        if b == B:
            def flash(q=q, k=k, v=v):
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            here["sdpa_flash"] = flash
        here["copy2"] = lambda k=k, v=v, kd=kd, vd=vd: (kd.copy_(k), vd.copy_(v))
        for n, fn in here.items():
            fns[f"B{b}/{n}"] = fn
            nbytes[f"B{b}/{n}"] = 2 * k.numel() * k.element_size()
    return fns, nbytes, keep


def check_variants(kerns):
    """Each variant against the float64 reference on ragged caches (lengths 0, 1, not a multiple of
    the tile), causal and not, every split path: its worst error must stay within 2x the default
    build's + 1e-3 (a variant may sum in another order; it may not be wrong)."""
    from fastmqa.reference import reference_fp64
    g = torch.Generator(device="cuda").manual_seed(0)
    worst = {n: 0.0 for n in kerns}
    for B, Hh, Sq, S, lens, dt, d in RAGGED_DECODE_CASES:
        q = torch.randn(B, Hh, Sq, d, device="cuda", dtype=dt, generator=g)
        k, v = (torch.randn(B, 1, S, d, device="cuda", dtype=dt, generator=g) for _ in range(2))
        sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
        for causal in (False, True):
            ref = reference_fp64(q, k, v, causal=causal, seqlens=sl)
            for ns in (0, 1, 2, 5, 16, 64):
                for name, kern in kerns.items():
                    o = kern(q, k, v, causal=causal, cache_seqlens=sl, num_splits=ns)
                    fin = torch.isfinite(ref)  # (a length-0 row: the kernels give zeros)
                    worst[name] = max(worst[name], float((o.double().cpu() - ref)[fin].abs().max()))
    ok = all(w <= 2 * worst["10_decode"] + 1e-3 for w in worst.values())
    stamp(f"variants against fp64 (worst abs error): {worst} -> {'OK' if ok else 'FAILED'}")
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--points", default="64:16384,64:32768", help="B:S,... (B = 64: also B = 66 and forced splits)")
    ap.add_argument("--no-fill", action="store_true", help="no B + 2 twins or forced splits at B = 64")
    ap.add_argument("--variants", default="", help="TAG:MACRO=V[;MACRO=V],... built with -D, timed at every point")
    ap.add_argument("--name", default="decode_fill_dev.json", help="the JSON file written under --out")
    args = ap.parse_args()
    build.extensions_dir()
    base = registry.get("10_decode")
    kerns = build_with_variants(base, parse_variants(args.variants))
    stamp("built " + ", ".join(kerns))
    if len(kerns) > 1 and not check_variants(kerns):
        raise SystemExit("a variant is wrong: not timed")
    points = [tuple(int(x) for x in p.split(":")) for p in args.points.split(",")]
    rows = []
    for clean in (False, True):
        timer = bench.Timer(clean_flush=clean)
        flush = "clean" if clean else "write"
        for B, S in points:
            fill = B == 64 and not args.no_fill
            fns, nbytes, keep = point_fns(kerns, B, S, (4, 8) if fill else (), fill)
            reps = args.reps if B * S >= 2**20 else 3 * args.reps
            t = timer.side_by_side(fns, reps=reps)
            base_t = t[f"B{B}/10_decode"]
            for n, ms in t.items():
                b, impl = n.split("/", 1)
                med = statistics.median(ms)
                row = dict(flush=flush, S=S, B=int(b[1:]), impl=impl, us=round(med * 1e3, 2),
                           GBps=round(nbytes[n] / med / 1e6, 1), vs_ours=bench.paired_ratio(ms, base_t))
                rows.append(row)
                stamp(f"{flush:5s} B={B:3d} S={S:6d} {n:24s} {row['us']:8.2f} us {row['GBps']:7.1f} GB/s "
                      f"t/t(ours) {row['vs_ours']['median']:.4f} [{row['vs_ours']['q1']:.3f}, {row['vs_ours']['q3']:.3f}]")
            write_rows(args.out, args.name, rows)
            del fns, keep
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
