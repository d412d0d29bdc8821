"""Where a decode step of a layer goes (GPU host): per-step wall time of back-to-back steps
(CPU-bound when the launches cannot keep ahead), the GPU time of one step (CUDA events after
an L2 flush; and with the launches queued ahead, as the layer suite), and torch.profiler's CPU
time per op and GPU time per kernel, for FastMQALayer and
the SDPA-GQA MQA layer at hidden 4096, 32 heads, context 4096.

    python scripts/dev_decode_step.py [--batches 4,64] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastmqa import bench  # noqa: E402
from fastmqa.generate import KVCache  # noqa: E402

from _devcommon import mqa_layer_pair, profile_table, stamp, write_rows  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="4,64")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    H, hidden, S = 32, 4096, 4096
    timer = bench.Timer()
    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        for name, make in mqa_layer_pair(hidden, H):
            layer = make().to(device="cuda", dtype=torch.bfloat16).eval()
            cache = KVCache.for_layer(layer, batch=B, max_seq_len=S)
            cache.step(S - 1)
            cache.step(1)
            slot = cache.layer(0)
            x = torch.randn(B, 1, hidden, device="cuda", dtype=torch.bfloat16)

            def step():
                with torch.inference_mode():
                    layer(x, kv_cache=slot)
            for _ in range(20):
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                step()
            torch.cuda.synchronize()
            wall_us = (time.perf_counter() - t0) / 200 * 1e6
            gpu_ms = timer(step)
            lead_ms = timer(step, lead=True)  # the GPU's work alone (launches queued ahead)
            table = profile_table(step, 20, "self_cpu_time_total")
            kernels = profile_table(step, 20, "self_cuda_time_total")
            rows.append(dict(B=B, impl=name, path=slot.last_path, wall_us_per_step=round(wall_us, 1),
                             timer_ms=round(gpu_ms, 4), lead_ms=round(lead_ms, 4), profile=table, kernels=kernels))
            stamp(f"B={B} {name:22s} path={slot.last_path}: back-to-back {wall_us:7.1f} us/step, timer {gpu_ms * 1e3:7.1f} us,"
                  f" GPU alone {lead_ms * 1e3:7.1f} us")
            print(kernels, flush=True)
            del layer, cache, slot, x
            torch.cuda.empty_cache()
    write_rows(args.out, "decode_step_dev.json", rows)


if __name__ == "__main__":
    main()
