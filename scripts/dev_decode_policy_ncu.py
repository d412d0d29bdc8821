"""DRAM bytes of 10_decode under each L2 policy for K/V, after the benchmark's flush (GPU host, ncu).

The decode suite's timer writes a 256 MB buffer before every call, which leaves L2 (50 MB) full of
dirty lines; the kernel's reads must then evict them, and DRAM writes them back while the kernel
streams. Whether the tiles are read with L2::evict_first or evict_normal changes the time by
+-4-11 % under that flush and not under a clean one (scripts/dev_decode_fill.py). This script
counts what DRAM did during the kernel, both policies (`FASTMQA_DECODE_KV_EVICT` variants), both
flushes, at two points: Nsight Compute with `--cache-control none`, so the flush's L2 state
reaches the kernel (ncu's default would write back and invalidate L2 first).

    python scripts/dev_decode_policy_ncu.py [--out DIR]

Writes DIR/decode_policy_ncu_dev.json: per (point, flush, policy) the kernel's duration and the
DRAM bytes read and written (metrics that ncu collects in one pass, so no replay sees an L2 that
the first pass changed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fastmqa import build, profile  # noqa: E402
from fastmqa import kernels as registry  # noqa: E402

POINTS = [(64, 32768), (4, 32768)]
POLICIES = {"first": ["FASTMQA_DECODE_KV_EVICT=0"], "normal": ["FASTMQA_DECODE_KV_EVICT=1"]}
METRICS = ["gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum"]  # one pass: L2 as the flush left it
H, D = 32, 128


def cases():
    return [(B, S, flush, pol) for B, S in POINTS for flush in ("write", "clean") for pol in POLICIES]


def child():
    """Run every case: flush (and, clean, read the buffer), then one decode call, twice; only the
    second call is between cudaProfilerStart/Stop."""
    base = registry.get("10_decode")
    kerns = {t: build.load_variant(base, t, d) for t, d in POLICIES.items()}
    buf = torch.empty(256 * 2**20 // 4, dtype=torch.float32, device="cuda")
    for B, S, flush, pol in cases():
        g = torch.Generator(device="cuda").manual_seed(B * S)
        q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(B, 1, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
        launch = kerns[pol].prepare(q, k, v, cache_seqlens=lens)[0]
        for i in range(2):
            buf.zero_()
            if flush == "clean":
                buf.amax()
            torch.cuda.synchronize()
            if i == 1:
                torch.cuda.profiler.start()
            launch()
            torch.cuda.synchronize()
            if i == 1:
                torch.cuda.profiler.stop()
        del q, k, v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        return child()
    build.extensions_dir()
    base = registry.get("10_decode")
    for t, d in POLICIES.items():  # build outside ncu
        build.load_variant(base, t, d)
    ncu = profile.find_ncu()
    cmd = [ncu, "--clock-control", "none", "--cache-control", "none", "--profile-from-start", "off", "--csv",
           "--print-units", "base", "-k", "regex:decode_kernel", "--metrics", ",".join(METRICS),
           sys.executable, __file__, "--child"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    print("\n".join(line for line in res.stdout.splitlines() if line.startswith("==PROF==") and "pass" in line)[:2000])
    launches = profile.parse_csv(res.stdout)
    if len(launches) != len(cases()):
        print(res.stdout[-3000:], res.stderr[-3000:])
        raise SystemExit(f"expected {len(cases())} profiled launches, got {len(launches)}")
    rows = []
    for (B, S, flush, pol), m in zip(cases(), launches):
        kv = 2 * B * S * D * 2
        row = dict(B=B, S=S, kv_MB=kv / 2**20, flush=flush, policy=pol, us=m["gpu__time_duration.sum"] / 1e3,
                   dram_read_MB=m["dram__bytes_read.sum"] / 2**20, dram_write_MB=m["dram__bytes_write.sum"] / 2**20)
        rows.append(row)
        print(f"B={B:3d} S={S:6d} {flush:5s} {pol:6s} {row['us']:8.1f} us  DRAM read {row['dram_read_MB']:8.1f} MB"
              f" (K/V {row['kv_MB']:.0f})  write {row['dram_write_MB']:6.1f} MB")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_policy_ncu_dev.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "ncu_flags": cmd[1:12], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
