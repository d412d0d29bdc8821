"""Where a layer forward's GPU time goes: torch.profiler's kernel table for fastmqa's MQA layer
and the SDPA (enable_gqa) layer at the layer suite's shapes, L2 flushed before each call.

    python scripts/dev_layer_profile.py [--seqs 2048,4096] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastmqa import bench_layer  # noqa: E402

from _devcommon import mqa_layer_pair, profile_table  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="2048,4096")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    H, E, dt = bench_layer.HEADS, bench_layer.HIDDEN, bench_layer.DTYPE
    flush = torch.empty(256 * 2**20 // 4, device="cuda")
    res = {}
    for S in (int(s) for s in args.seqs.split(",")):
        B = bench_layer.TOKENS // S
        x = torch.randn(B, S, E, device="cuda", dtype=dt)
        for name, make in mqa_layer_pair(E, H):
            m = make().to(device="cuda", dtype=dt).eval()
            with torch.inference_mode():
                for _ in range(3):
                    m(x)
                torch.cuda.synchronize()

                def step(m=m):
                    flush.zero_()
                    m(x)
                table = profile_table(step, 5, "cuda_time_total")
            print(f"== {name} B={B} S={S}\n{table}", flush=True)
            res[f"{name} S={S}"] = table
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "layer_profile_dev.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
