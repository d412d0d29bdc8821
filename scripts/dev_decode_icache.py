"""Is a small decode point's time the kernel's instructions arriving? (GPU host)

The suite's timer writes 256 MB before every repetition, which evicts from L2 the data *and the
code* of the kernel about to run: a kernel whose CTAs each run a few thousand instructions once
(a decode CTA with one or two tiles) may then wait on instruction fetches from DRAM. This script
times 10_decode, SDPA (enable_gqa: cuDNN here), the two-kernel copy of K and V and a near-empty
kernel under three conditions, side by side (rotating order, paired repetitions):

  flush       the suite's flush, then the call (cold data, cold code: what the suite measures);
  code        the flush, then the same call on twin tensors of the same shape, far from the
              call's own in memory (outside the events), then the call: cold data, code already
              fetched into L2 and the SMs' instruction caches;
  tlb         the flush, then a strided read of one element per 4 KB of the call's K and V
              (its pages' address translations warm, ~3 % of its lines in L2), then the call.

    python scripts/dev_decode_icache.py [--out DIR] [--variants TAG:MACRO=V,...]

--variants builds -D variants of 10_decode and times them in the same repetitions, after checking
that they give the default's bits. Writes DIR/decode_icache_dev.json.

Session 13 (results/decode_icache_dev.json): warm code saves ours 0.6-1.3 us at the small points
and SDPA about as much (the ratio to SDPA narrows only at B16 S1k); warm address translations save
nothing. Two remedies were timed as variants
(FASTMQA_DECODE_DRY, removed since): a dry first iteration of the tile loop (every key masked, on
a zeroed stage, run while tile 0 is in flight) was 0-3.5 % slower; a dry pass of the combine
kernel before its griddepcontrol.wait was 0.996-1.039x, within the repetitions' spread.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastmqa import bench, build  # noqa: E402
from fastmqa import kernels as registry  # noqa: E402

from _devcommon import RAGGED_DECODE_CASES, build_with_variants, parse_variants, stamp, write_rows  # noqa: E402

POINTS = [(1, 1024), (1, 4096), (4, 1024), (16, 1024), (64, 1024), (1, 32768), (4, 32768), (64, 4096), (64, 16384)]
H, D, DT = 32, 128, torch.bfloat16


def inputs(B, S, seed, far=False):
    """q, k, v, lens; far: carved out of a fresh buffer 64 MiB past its start (other pages)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(B, H, 1, D), (B, 1, S, D), (B, 1, S, D)]
    if not far:
        q, k, v = (torch.randn(s, device="cuda", dtype=DT, generator=g) for s in shapes)
        return q, k, v, torch.full((B,), S, dtype=torch.int32, device="cuda")
    sizes = [math.prod(s) for s in shapes]
    pad = 32 * 2**20  # elements of bf16: 64 MiB
    buf = torch.empty(pad + sum(sizes) + 4096, device="cuda", dtype=DT)
    out, off = [], pad
    for s, n in zip(shapes, sizes):
        out.append(buf[off:off + n].view(s).normal_(generator=g))
        off += (n + 255) // 256 * 256
    lens = buf[off:off + 2 * B].view(torch.int32)
    lens.fill_(S)
    return (*out, lens)


def fns_for(kerns, q, k, v, lens):
    kd, vd = torch.empty_like(k), torch.empty_like(v)
    tiny = torch.zeros(1, device="cuda")
    out = {name: kern.prepare(q, k, v, cache_seqlens=lens)[0] for name, kern in kerns.items()}
    out["torch.sdpa_gqa"] = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    out["copy2"] = lambda: (kd.copy_(k), vd.copy_(v))
    out["empty"] = lambda: tiny.add_(1)
    return out


def time_conditions(timer, fns, twins, touch, reps):
    """{cond: {name: [ms]}}: bench.Timer.side_by_side over every (cond, name), the condition's
    step run after the flush, outside the events."""
    conds = ("flush", "code", "tlb")
    pairs = {f"{c}/{n}": fn for c in conds for n, fn in fns.items()}
    before = {f"code/{n}": fn for n, fn in twins.items()} | {f"tlb/{n}": touch for n in fns}
    t = timer.side_by_side(pairs, reps=reps, before=before)
    out = {c: {} for c in conds}
    for key, ms in t.items():
        c, n = key.split("/", 1)
        out[c][n] = ms
    return out


def check_bitwise(kerns):
    """Every variant gives the default's bits (o and lse) on ragged caches, every split path."""
    base = kerns["10_decode"]
    g = torch.Generator(device="cuda").manual_seed(0)
    bad = []
    for B, Hh, Sq, S, lens, dt, d in RAGGED_DECODE_CASES:
        q = torch.randn(B, Hh, Sq, d, device="cuda", dtype=dt, generator=g)
        k, v = (torch.randn(B, 1, S, d, device="cuda", dtype=dt, generator=g) for _ in range(2))
        sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
        for causal in (False, True):
            for ns in (0, 1, 2, 5, 16, 64):
                ref = base(q, k, v, causal=causal, cache_seqlens=sl, num_splits=ns, return_lse=True)
                for name, kern in kerns.items():
                    out = kern(q, k, v, causal=causal, cache_seqlens=sl, num_splits=ns, return_lse=True)
                    if not (torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])):
                        bad.append((name, B, S, d, causal, ns))
    stamp(f"bitwise check of the variants: {'ALL EQUAL' if not bad else bad}")
    return not bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--variants", default="", help="TAG:MACRO=V[;MACRO=V],... built with -D")
    ap.add_argument("--reps", type=int, default=40)
    args = ap.parse_args()
    build.extensions_dir()
    base = registry.get("10_decode")
    kerns = build_with_variants(base, parse_variants(args.variants))
    stamp("built " + ", ".join(kerns))
    check_bitwise(kerns)
    timer = bench.Timer()
    rows = []
    for B, S in POINTS:
        q, k, v, lens = inputs(B, S, B * S)
        q2, k2, v2, lens2 = inputs(B, S, B * S + 1, far=True)
        fns, twins = fns_for(kerns, q, k, v, lens), fns_for(kerns, q2, k2, v2, lens2)
        kf, vf = k.view(-1)[::2048], v.view(-1)[::2048]  # one element per 4 KB
        reps = args.reps if B * S <= 4 * 32768 else max(10, args.reps // 3)
        t = time_conditions(timer, fns, twins, lambda: (kf.sum(), vf.sum()), reps)
        for c, per in t.items():
            row = dict(B=B, S=S, cond=c, us={n: round(statistics.median(x) * 1e3, 2) for n, x in per.items()})
            ours = per["10_decode"]
            row["x_sdpa"] = bench.paired_ratio(per["torch.sdpa_gqa"], ours)
            for n in per:
                if n.startswith("10_decode_"):
                    row[f"x_{n}"] = bench.paired_ratio(ours, per[n])  # > 1: the variant is faster
            rows.append(row)
            stamp(f"B={B:3d} S={S:6d} {c:10s} " + " ".join(f"{n} {u:7.2f}" for n, u in row["us"].items())
                  + f" | x_sdpa {row['x_sdpa']['median']:.3f}")
        write_rows(args.out, "decode_icache_dev.json", rows)
        del q, k, v, q2, k2, v2, fns, twins
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
