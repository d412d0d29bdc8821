"""Where a layer's forward time goes on a GPU: per-kernel CUDA time (torch.profiler / CUPTI) of
FastMQALayer and the SDPA-based GQALayer(kv_heads=1) at the layer suite's shape, bf16.

    python scripts/dev_layer.py [--S 8192] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastmqa.bench_layer import HEADS, HIDDEN, TOKENS  # noqa: E402
from fastmqa.layers import FastMQALayer, GQALayer  # noqa: E402


def kernel_times(module, x, reps=10):
    with torch.inference_mode():
        for _ in range(3):
            module(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                module(x)
            torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.device_time_total > 0:
            out[e.key] = out.get(e.key, 0.0) + e.device_time_total / reps / 1000.0  # ms per forward
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, nargs="+", default=[512, 8192])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    log = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "points": []}
    for S in args.S:
        B = max(1, TOKENS // S)
        x = torch.randn(B, S, HIDDEN, device="cuda", dtype=torch.bfloat16)
        for name, make in (("fastmqa.layer", lambda: FastMQALayer(HIDDEN, HEADS, causal=True)),
                           ("torch.sdpa_gqa_layer", lambda: GQALayer(HIDDEN, HEADS, 1, causal=True))):
            m = make().to(device="cuda", dtype=torch.bfloat16).eval()
            kt = kernel_times(m, x)
            log["points"].append(dict(S=S, B=B, impl=name, total_ms=sum(kt.values()), kernels=kt))
            print(f"S={S} B={B} {name}: {sum(kt.values()):.3f} ms of kernels")
            for k, ms in list(kt.items())[:8]:
                print(f"    {ms:8.4f}  {k[:110]}")
            del m
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "layer_dev.json").write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
