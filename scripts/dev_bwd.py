"""Dev run of a backward kernel on the GPU host: build, gradient grid, quick backward timings,
and a profile of the layer forward (FastMQALayer vs the SDPA-GQA layer). Writes to $OUT.

    python scripts/dev_bwd.py [--kernel 08_flash_wgmma] [--quick] [--bench [--quick-bench]] [--profile]
--kernel names the forward whose backward kernel is checked (default 06_flash_mma: 07_flash_bwd);
the benchmark times every backward kernel of the registry side by side."""
import json, os, sys, time
import torch
from fastmqa import kernels, gridcheck, bench, ops
from fastmqa.build import build_all

OUT = os.environ.get("OUT", "/tmp")
name = sys.argv[sys.argv.index("--kernel") + 1] if "--kernel" in sys.argv else "06_flash_mma"
kern = kernels.get(name)
t0 = time.time()
print("build:", build_all([k for k in kernels.REGISTRY if k.backward]), f"{time.time() - t0:.0f}s", flush=True)
cases = gridcheck.run_backward_grid(kern, quick="--quick" in sys.argv)
print("backward grid:", gridcheck.summarize(cases), flush=True)
for c in cases:
    if not c.ok:
        print("  FAIL", c)
json.dump([c.__dict__ for c in cases], open(f"{OUT}/bwd_grid_{name}.json", "w"), indent=1, default=str)
# autograd through the op, fp16 and bf16, plus extreme inputs
for dtype in (torch.bfloat16, torch.float16):
    q = torch.randn(2, 8, 100, 64, device="cuda", dtype=dtype)
    k = torch.randn(2, 1, 77, 64, device="cuda", dtype=dtype)
    print(dtype, ops.gradient_errors(q, k, k.clone(), causal=True), flush=True)
    qq, kk, vv = (t.detach().requires_grad_() for t in (q * 1e3, k * 1e3, k.clone()))
    ops.mqa_attention(qq, kk, vv).backward(torch.zeros_like(q))
    print("zero grad ->", [float(t.grad.abs().max()) for t in (qq, kk, vv)],
          "finite", all(bool(torch.isfinite(t.grad).all()) for t in (qq, kk, vv)), flush=True)
if "--bench" in sys.argv:
    timer = bench.Timer()
    rows, skipped = bench.suite_backward(timer, quick="--quick-bench" in sys.argv)
    for r in rows:
        print(r["impl"], r["D"], r["causal"], r["Sq"], r["ms"], r["tflops"], flush=True)
    json.dump(dict(rows=rows, skipped=skipped), open(f"{OUT}/bwd_bench.json", "w"), indent=1)
if "--profile" in sys.argv:
    from fastmqa.layers import FastMQALayer, GQALayer
    from torch.profiler import profile, ProfilerActivity
    for S in (512, 8192):
        B = 16384 // S
        x = torch.randn(B, S, 4096, device="cuda", dtype=torch.bfloat16)
        for name, m in (("fastmqa", FastMQALayer(4096, 32, causal=True)), ("sdpa_gqa", GQALayer(4096, 32, 1, causal=True))):
            m = m.cuda().to(torch.bfloat16)
            with torch.inference_mode():
                for _ in range(3):
                    m(x)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        m(x)
                    torch.cuda.synchronize()
            print(f"== {name} S={S}")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
