"""Where a decode call's time goes: per-kernel GPU durations (torch.profiler / CUPTI) of
10_decode (decode + combine) and of SDPA with enable_gqa, on the decode grid, L2 flushed between
calls, plus the gap between a call's first kernel start and its last kernel end.

    python scripts/dev_timeline.py [--out DIR] [--variant TAG=-DX=1,...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastmqa import bench, build  # noqa: E402
from fastmqa import kernels as registry  # noqa: E402

GRID = [(B, S) for B in (1, 4, 16, 64) for S in (1024, 4096, 16384, 32768)]
H, D, DT = 32, 128, torch.bfloat16


def timeline(fn, flush, reps=20):
    """Per call: [(kernel name, start us, duration us)] of the kernels fn launched."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush()
            torch.cuda._sleep(20000)  # the GPU waits, so the CPU's launches are queued ahead
            fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    evs.sort(key=lambda e: e.time_range.start)
    calls, cur = [], None
    for e in evs:
        n, low = e.name, e.name.lower()
        if "spin" in low or "sleep" in low or "fill" in low:  # the flush and the wait end a call
            if cur:
                calls.append(cur)
            cur = [] if ("spin" in low or "sleep" in low) else None
            continue
        if cur is not None:
            cur.append((n, e.time_range.start, e.time_range.end - e.time_range.start))
    if cur:
        calls.append(cur)
    if not any(calls):
        print("no calls found; kernels seen:", sorted({e.name[:50] for e in evs}))
    return [c for c in calls if c]


def summarize(calls):
    per = defaultdict(list)
    spans = []
    for c in calls:
        for n, s, d in c:
            per[n[:60]].append(d)
        spans.append(c[-1][1] + c[-1][2] - c[0][1])
    med = lambda x: sorted(x)[len(x) // 2] if x else float("nan")
    return {"span_us": med(spans), "kernels": {n: med(v) for n, v in per.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--variant", action="append", default=[], help="TAG=DEF1,DEF2 (10_decode -D variants)")
    args = ap.parse_args()
    build.extensions_dir()
    kerns = {"10_decode": registry.get("10_decode")}
    for v in args.variant:
        tag, defs = v.split("=", 1)
        kerns[tag] = build.load_variant(registry.get("10_decode"), tag, defs.split(","))
    for k in kerns.values():
        k.module()
    flushbuf = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    flush = lambda: flushbuf.zero_()
    gqa = bench.torch_paths(small=False)["torch.sdpa_gqa"]
    out = []
    for B, S in GRID:
        g = torch.Generator(device="cuda").manual_seed(B * S)
        q = torch.randn(B, H, 1, D, device="cuda", dtype=DT, generator=g)
        kv = torch.randn(2, B, 1, S, D, device="cuda", dtype=DT, generator=g)
        k, v = kv[0], kv[1]
        lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
        row = {"B": B, "S": S}
        for name, kern in kerns.items():
            row[name] = summarize(timeline(kern.prepare(q, k, v, cache_seqlens=lens)[0], flush))
            if name == "10_decode":  # the same full cache without seqlens (what SDPA is given)
                row[name + "/nolens"] = summarize(timeline(kern.prepare(q, k, v)[0], flush))
        row["sdpa_gqa"] = summarize(timeline(lambda: gqa(q, k, v, False), flush))
        kd, vd = torch.empty_like(k), torch.empty_like(v)
        row["copy2"] = summarize(timeline(lambda: (kd.copy_(k), vd.copy_(v)), flush))
        out.append(row)
        print(f"B={B:3d} S={S:6d} " + " | ".join(
            f"{n}: span {r['span_us']:7.1f} us [" + ", ".join(f"{kn[:28]} {kd_:.1f}" for kn, kd_ in r['kernels'].items()) + "]"
            for n, r in row.items() if isinstance(r, dict)), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    import datetime
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "shape": {"H": H, "D": D, "dtype": str(DT)[6:], "Sq": 1}, "variants": args.variant, "rows": out}
    (Path(args.out) / "timeline.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
