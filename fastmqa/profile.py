"""Hardware counters of registry kernels, read with Nsight Compute (ncu).

    python -m fastmqa.profile                          # the fp32 chapters at the seed shape
    python -m fastmqa.profile --kernels 02_smem_tiled,03_warp_shuffle --out results/ncu.json
    python -m fastmqa.profile --kernels 06_flash_mma,08_flash_wgmma,torch.sdpa_flash,torch.sdpa_cudnn \
        --shape 2,32,8192,128 --out results/ncu_prefill.json   # PyTorch's paths too (bf16)
    python -m fastmqa.profile --kernels 10_decode,torch.sdpa_flash,torch.sdpa_gqa \
        --shape 64,32,32768,128 --sq 1 --out results/ncu_decode.json   # decoding: one query row a head

For each kernel the parent runs a small child process under

    ncu --clock-control none --profile-from-start off --csv --metrics <METRICS> \\
        python -m fastmqa.profile --child NAME ...

The child builds its inputs, runs the kernel twice to warm up, then runs it once between
cudaProfilerStart/Stop, so ncu measures exactly the launches of one call (cuBLAS's kernels
and the softmax, for 04_cublas). The parent parses ncu's CSV and writes

    {"device", "date", "ncu", "shape": {...}, "rows": [{impl, kernel_function, block, grid,
      <metric name>: value, ...}]}

Values are in ncu's base units (ns for gpu__time_duration.sum, bytes, percent). `table()`
turns rows into the short columns the chapters show, `load()` reads the file (None if missing).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "results" / "ncu.json"
SEED = dict(B=4, H=32, S=512, D=128)

# name in the JSON rows -> (ncu metric, what it tells)
METRICS = {
    "time_us": ("gpu__time_duration.sum", "kernel duration"),
    "dram_pct": ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "DRAM bandwidth, % of peak"),
    "mem_pct": ("gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
                "busiest memory unit (L1, L2 or DRAM), % of peak"),
    "sm_pct": ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "busiest SM pipeline, % of peak"),
    "occupancy_pct": ("sm__warps_active.avg.pct_of_peak_sustained_active", "achieved occupancy"),
    "theoretical_occupancy_pct": ("sm__maximum_warps_per_active_cycle_pct", "occupancy the launch allows"),
    "bank_conflicts_ld": ("l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum", "shared loads: extra wavefronts"),
    "bank_conflicts_st": ("l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum", "shared stores: extra wavefronts"),
    "smem_ld_wavefronts": ("l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum", "shared-memory load wavefronts"),
    "instructions": ("smsp__inst_executed.sum", "warp instructions executed"),
    "ffma_threads": ("smsp__sass_thread_inst_executed_op_ffma_pred_on.sum", "FFMA thread instructions"),
    "tensor_pct": ("sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
                   "tensor pipe (HMMA: mma.sync), % of active cycles"),
    "tensor_gmma_pct": ("sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
                        "tensor pipe (GMMA: wgmma), % of active cycles"),
    "issue_pct": ("sm__inst_issued.avg.pct_of_peak_sustained_active", "instruction issue slots used, % of active cycles"),
    "registers": ("launch__registers_per_thread", "registers per thread"),
    "smem_static": ("launch__shared_mem_per_block_static", "static shared memory per block, bytes"),
    "smem_dynamic": ("launch__shared_mem_per_block_dynamic", "dynamic shared memory per block, bytes"),
    "dram_read_sectors": ("dram__sectors_read.sum", "32-byte sectors read from DRAM"),
    "l2_read_sectors": ("lts__t_sectors_srcunit_tex_op_read.sum", "sectors the SMs' loads asked of L2"),
    "l2_read_requests": ("lts__t_requests_srcunit_tex_op_read.sum", "requests the SMs' loads made of L2"),
    "l2_read_hit_sectors": ("lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum", "of those sectors, L2 hits"),
}


# the ones each chapter's prose relies on
CORE = {METRICS[k][0] for k in ("time_us", "dram_pct", "mem_pct", "sm_pct", "occupancy_pct", "bank_conflicts_ld",
                                "bank_conflicts_st", "registers", "smem_static", "smem_dynamic")}


# -- reading results ---------------------------------------------------------------------
def load(path=None):
    """The parsed results/ncu.json, or None if it does not exist."""
    p = Path(path or DEFAULT_OUT)
    return json.loads(p.read_text()) if p.exists() else None


def table(data, impls=None):
    """Rows with short column names (time in µs), optionally only for `impls`; one row per
    kernel launch (04_cublas has three: two GEMMs and the softmax)."""
    if not data:
        return []
    out = []
    for row in data["rows"]:
        if impls and row["impl"] not in impls:
            continue
        r = {"impl": row["impl"], "kernel": short_name(row["kernel_function"]),
             "block": row.get("block"), "grid": row.get("grid")}
        for key, (metric, _) in METRICS.items():
            v = row.get(metric)
            if v is not None and key == "time_us":
                v = v / 1e3  # ns -> µs
            r[key] = v
        # bank conflicts as a share of all shared-memory load wavefronts
        w, c = r.get("smem_ld_wavefronts"), r.get("bank_conflicts_ld")
        r["conflict_pct"] = 100.0 * c / w if w and c is not None else None
        out.append(r)
    return out


def occupancy(registers, threads, smem_bytes, regs_per_sm=65536, max_warps=64, max_blocks=32,
              smem_per_sm=233472, smem_reserved=1024):
    """How many blocks of a kernel fit on one SM, and what limits it (H100 numbers by default).

    Registers are allocated per warp in units of 8 per thread; each block also reserves 1 KB of
    shared memory. Returns {blocks, warps, occupancy_pct, limit, by_registers, by_smem, by_warps}."""
    warps_per_block = -(-threads // 32)
    regs_per_warp = -(-registers // 8) * 8 * 32
    by_regs = (regs_per_sm // regs_per_warp) // warps_per_block if registers else max_blocks
    by_smem = smem_per_sm // (smem_bytes + smem_reserved)
    by_warps = max_warps // warps_per_block
    limits = {"warps": by_warps, "blocks": max_blocks, "registers": by_regs, "shared memory": by_smem}
    limit = min(limits, key=limits.get)
    blocks = limits[limit]
    return dict(blocks=blocks, warps=blocks * warps_per_block, occupancy_pct=100.0 * blocks * warps_per_block / max_warps,
                limit=limit, by_registers=by_regs, by_smem=by_smem, by_warps=by_warps)


def short_name(fn: str) -> str:
    """'void smem_tiled::mqa_smem_tiled_kernel<128>(const float *, ...)' -> 'mqa_smem_tiled_kernel<128>'."""
    s = fn.split("(")[0].replace("void ", "").strip()
    depth, cut = 0, 0
    for n, ch in enumerate(s):  # drop namespaces outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if depth == 0 and s[n:n + 2] == "::":
            cut = n + 2
    return s[cut:] if len(s) - cut > 3 else s


# -- parsing ncu ---------------------------------------------------------------------------
def _number(s: str):
    s = s.strip().replace(",", "")
    if s in ("", "n/a", "N/A"):
        return None
    try:
        v = float(s)
    except ValueError:
        return s
    return int(v) if v.is_integer() and "." not in s else v


def parse_csv(text: str) -> list[dict]:
    """ncu --csv output (one line per metric) -> one dict per profiled launch, in order."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    if not lines:
        return []
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    launches: dict[str, dict] = {}
    for rec in reader:
        if rec.get("ID") in (None, "ID"):
            continue
        launch = launches.setdefault(rec["ID"], {
            "kernel_function": rec.get("Kernel Name", ""),
            "block": rec.get("Block Size", ""), "grid": rec.get("Grid Size", "")})
        launch[rec["Metric Name"]] = _number(rec.get("Metric Value", ""))
    return [launches[k] for k in sorted(launches, key=lambda x: int(x) if x.isdigit() else x)]


# -- running -------------------------------------------------------------------------------
def find_ncu() -> str | None:
    for cand in (shutil.which("ncu"), "/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/ncu"):
        if cand and Path(cand).exists():
            return cand
    found = sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu")) if Path("/opt/nvidia").exists() else []
    return str(found[-1]) if found else None


def available_metrics(ncu: str, wanted: list[str]) -> list[str]:
    """Drop metrics this ncu does not know (one unknown name would fail the whole run)."""
    try:
        out = subprocess.run([ncu, "--query-metrics"], capture_output=True, text=True, timeout=120).stdout
    except Exception:
        return wanted
    known = {ln.split()[0] for ln in out.splitlines() if ln.strip() and "__" in ln.split()[0]}
    if not known:
        return wanted
    # launch__* and the occupancy metrics come from ncu's own launch statistics, which the
    # hardware-metric list may not show: keep them.
    keep = [m for m in wanted if m.split(".")[0] in known or m.startswith(("launch__", "sm__maximum_warps"))]
    dropped = sorted(set(wanted) - set(keep))
    if dropped:
        print(f"[profile] this ncu does not know {', '.join(dropped)}; skipping them", file=sys.stderr)
    return keep


def shape_for(kern, B, H, S, D):
    import torch
    dtype = torch.float32 if torch.float32 in kern.dtypes else kern.dtypes[0]
    D = D if D in kern.head_dims else kern.head_dims[-1]
    Sq = S if kern.max_sq is None else min(S, kern.max_sq)
    return dtype, B, H, Sq, S, D


def child(name, B, H, S, D, causal, sq=None):
    import torch

    from . import bench, kernels
    if name.startswith("torch."):  # a PyTorch path of the benchmarks (bench.torch_paths): bf16, or the
        # dtype after an "@" ("torch.sdpa_efficient@float32": PyTorch's fp32 path, TF32 matmuls off)
        path, _, dt = name.partition("@")
        dtype = getattr(torch, dt or "bfloat16", None)
        if not isinstance(dtype, torch.dtype):
            raise SystemExit(f"unknown dtype {dt!r} in {name!r} (e.g. torch.sdpa_efficient@float32)")
        torch.backends.cuda.matmul.allow_tf32 = False
        kern, Sq, Skv = None, sq or S, S
    else:  # a registry kernel, or "name#N": the kernel with num_splits = N (a prefill kernel's cfg)
        base, _, cfg = name.partition("#")
        kern = kernels.get(base)
        dtype, B, H, Sq, Skv, D = shape_for(kern, B, H, S, D)
        Sq = min(sq, Sq) if sq else Sq
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, Sq, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, 1, Skv, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, 1, Skv, D, device="cuda", dtype=dtype, generator=g)
    if kern is None:
        fn = bench.torch_paths(small=False)[path]
        launch = lambda: fn(q, k, v, causal)  # noqa: E731
    else:
        kw = {}
        if kern.kind == "decode":
            kw["cache_seqlens"] = torch.full((B,), Skv, dtype=torch.int32, device="cuda")
        if cfg:
            kw["num_splits"] = int(cfg)
        launch = kern.prepare(q, k, v, causal=causal, **kw)[0]
    for _ in range(2):
        launch()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    launch()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"[profile child] {name} {str(dtype).replace('torch.', '')} B={B} H={H} Sq={Sq} Skv={Skv} D={D} causal={causal}")


def profile(names, out, B, H, S, D, causal=False, timeout=900, sq=None):
    import torch

    from . import build, kernels
    ncu = find_ncu()
    if ncu is None:
        raise SystemExit("ncu (Nsight Compute) not found: put it on PATH")
    # PyTorch's paths ("torch.sdpa_cudnn", bench.torch_paths) need no build
    entries = list({n.partition("#")[0]: kernels.get(n.partition("#")[0]) for n in names if not n.startswith("torch.")}.values())
    errs = {n: e for n, e in build.build_all(entries).items() if e is not None}
    for n, e in errs.items():
        print(f"[profile] {n}: build failed, skipped: {e}", file=sys.stderr)
    metrics = available_metrics(ncu, [m for m, _ in METRICS.values()])
    rows, failed = [], {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    for name in names:
        if name.partition("#")[0] in errs:
            failed[name] = "build failed"
            continue
        print(f"[profile] {name} ...", flush=True)
        # If this ncu rejects a metric name the whole run fails: retry with the core set.
        for mset in (metrics, [m for m in metrics if m in CORE]):
            cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--csv", "--print-units", "base",
                   "--metrics", ",".join(mset), sys.executable, "-m", "fastmqa.profile", "--child", name,
                   "--shape", f"{B},{H},{S},{D}"] + (["--causal"] if causal else []) + (["--sq", str(sq)] if sq else [])
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
            except subprocess.TimeoutExpired:
                res = None
                break
            launches = parse_csv(res.stdout)
            if res.returncode == 0 and launches:
                break
        if res is None:
            failed[name] = f"ncu took more than {timeout} s"
            continue
        if res.returncode != 0 or not launches:
            tail = (res.stderr or res.stdout).strip().splitlines()[-5:]
            failed[name] = f"ncu exit {res.returncode}: " + " | ".join(tail)
            print(f"[profile] {name} failed: {failed[name]}", file=sys.stderr)
            continue
        for launch in launches:
            rows.append({"impl": name, **launch})
    data = {"device": torch.cuda.get_device_name(0), "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "ncu": ncu, "clock_control": "none",
            "shape": dict(B=B, H=H, S=S, D=D, causal=causal, **({"Sq": sq} if sq else {})), "metrics": {k: m for k, (m, _) in METRICS.items()},
            "failed": failed, "rows": rows}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, out)
    return data


DEFAULT_COLS = ["impl", "kernel", "time_us", "dram_pct", "mem_pct", "sm_pct", "occupancy_pct",
                "bank_conflicts_ld", "bank_conflicts_st", "registers", "smem_static", "smem_dynamic"]


def format_table(rows, cols=None) -> str:
    """A plain-text table of `table()` rows (kernel names shortened to 40 characters)."""
    cols = cols or DEFAULT_COLS
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) < 1e6 else f"{v:.3g}"
        if isinstance(v, int) and abs(v) >= 10**7:
            return f"{v:.3g}"
        if isinstance(v, str) and len(v) > 40:
            return v[:37] + "..."
        return "-" if v is None else str(v)
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastmqa.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", help="comma-separated registry names (name#N: with num_splits N) or PyTorch paths such as torch.sdpa_cudnn "
                                      "(bf16; torch.sdpa_efficient@float32 for another dtype) (default: the fp32 suite)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON file to write (default results/ncu.json)")
    ap.add_argument("--shape", default="{B},{H},{S},{D}".format(**SEED), help="B,H,S,D (default the seed shape)")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--sq", type=int, default=None, help="query rows a head (default S; decoding: 1)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    try:
        B, H, S, D = (int(x) for x in a.shape.split(","))
    except ValueError:
        ap.error(f"--shape must be B,H,S,D (four integers), got {a.shape!r}")
    if a.child:
        return child(a.child, B, H, S, D, a.causal, a.sq)
    from . import kernels
    names = [n.strip() for n in a.kernels.split(",") if n.strip()] if a.kernels else [k.name for k in kernels.in_suite("fp32")]
    for n in names:
        if not n.startswith("torch."):
            kernels.get(n.partition("#")[0])  # a KeyError naming the known kernels
    if a.sq is not None and a.sq < 1:
        ap.error(f"--sq must be a positive number of query rows, got {a.sq}")
    data = profile(names, a.out, B, H, S, D, a.causal, sq=a.sq)
    print(format_table(table(data)))
    if data["failed"]:
        print("failed:", data["failed"])
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
