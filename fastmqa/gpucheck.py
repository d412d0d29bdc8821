"""The GPU check: `python -m fastmqa.gpucheck` on a GPU host.

1. builds every registry kernel, in parallel;
2. checks every kernel over the full shape grid against the float64 reference
   (`fastmqa.gridcheck`: odd S, S=1, non-multiple-of-tile, Sq != Skv, D 64/128,
   causal and not, every supported dtype, ragged decode lengths);
3. runs compute-sanitizer memcheck, racecheck and synccheck on every kernel at a small shape;
4. optionally executes every notebook (`--notebooks`, nbclient, outputs written in place)
   and validates them with nbval (`--nbval`);
and writes a pass/fail summary to results/gpucheck.json and, when $OUT is set, $OUT.
Exit code 0 only if every check passed.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")


def _small_case(kern):
    """Run `kern` once per dtype at a small, odd shape (for compute-sanitizer)."""
    import torch
    for dtype in kern.dtypes:
        D = kern.head_dims[0]
        for causal in ((False, True) if kern.causal else (False,)):
            if kern.kind == "decode":
                B, H, Sq, S = 3, 8, min(2, kern.max_sq or 2), 300
                lens = torch.tensor([300, 1, 77], dtype=torch.int32, device="cuda")
            else:
                B, H, Sq, S, lens = 1, 4, 70, 90, None
            q = torch.randn(B, H, Sq, D, device="cuda").to(dtype)
            k = torch.randn(B, 1, S, D, device="cuda").to(dtype)
            v = torch.randn(B, 1, S, D, device="cuda").to(dtype)
            if lens is not None:
                kern(q, k, v, causal=causal, cache_seqlens=lens)
            elif kern.backward:  # the forward, then its backward kernel
                o, lse = kern(q, k, v, causal=causal, return_lse=True)
                kern.run_backward(torch.randn_like(o), q, k, v, o, lse, causal=causal)
            else:
                kern(q, k, v, causal=causal)
            for path in kern.paths:  # its other code paths, forced
                kern(q, k, v, causal=causal, num_splits=path)
            torch.cuda.synchronize()


def _child(name):
    from . import kernels
    _small_case(kernels.get(name))
    print(f"child {name}: ran")


def sanitize(name, tool, timeout=600):
    exe = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    cmd = [exe, "--tool", tool, "--error-exitcode", "9", sys.executable, "-m", "fastmqa.gpucheck", "--child", name]
    if tool == "racecheck":
        cmd[3:3] = ["--racecheck-report", "all"]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        out = (p.stdout + p.stderr)
        # memcheck/synccheck print "ERROR SUMMARY: 0 errors", racecheck "RACECHECK SUMMARY: ... (0 errors, ...".
        ok = p.returncode == 0 and re.search(r"SUMMARY: (0 errors|.*\(0 errors)", out) is not None
        tail = "\n".join(l for l in out.splitlines() if "=========" in l)[-1500:]
    except subprocess.TimeoutExpired:
        ok, tail = False, f"timed out after {timeout} s"
    return {"kernel": name, "tool": tool, "ok": ok, "seconds": round(time.time() - t0, 1), "report": tail}


def run_notebooks(paths, timeout=600):
    import nbformat
    from nbclient import NotebookClient
    res = []
    for p in paths:
        t0 = time.time()
        nb = nbformat.read(p, as_version=4)
        try:
            NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(Path(p).parent)}}).execute()
            ok, msg = True, ""
        except Exception as e:
            ok, msg = False, f"{type(e).__name__}: {str(e)[-800:]}"
        nbformat.write(nb, p)
        res.append({"notebook": str(Path(p).resolve().relative_to(ROOT)), "ok": ok, "seconds": round(time.time() - t0, 1),
                    "error": msg})
        print(f"notebook {p}: {'ok' if ok else 'FAIL'} ({time.time() - t0:.0f} s) {msg[:300]}", flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastmqa.gpucheck", description="Build, check and sanitize every kernel on a GPU.")
    ap.add_argument("--kernels", default=None, help="comma-separated registry names (default: all)")
    ap.add_argument("--quick", action="store_true", help="a smaller shape grid")
    ap.add_argument("--no-sanitizer", action="store_true")
    ap.add_argument("--sanitizer-tools", default=",".join(SANITIZER_TOOLS))
    ap.add_argument("--notebooks", action="store_true", help="execute notebooks/*.ipynb in place (nbclient)")
    ap.add_argument("--nbval", action="store_true", help="run pytest --nbval-lax on notebooks/")
    ap.add_argument("--fuzz", type=int, default=0, help="random cases per kernel for the GPU fuzz run (fastmqa.fuzz; also runs the determinism check)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0

    import torch
    from . import gridcheck, kernels
    from .build import build_all
    # Bad arguments are usage errors (exit 2 naming them) on any machine, GPU or not.
    names = args.kernels.split(",") if args.kernels else [k.name for k in kernels.REGISTRY]
    try:
        entries = [kernels.get(n) for n in names]
    except KeyError as e:
        ap.error(str(e.args[0]))
    if args.fuzz < 0:
        ap.error(f"--fuzz must be >= 0 (examples per kernel), got {args.fuzz}")
    bad_tools = [t for t in args.sanitizer_tools.split(",") if t not in SANITIZER_TOOLS + ("initcheck",)]
    if bad_tools:
        ap.error(f"unknown --sanitizer-tools {', '.join(bad_tools)}; choose from {', '.join(SANITIZER_TOOLS)}, initcheck")
    if not torch.cuda.is_available():
        print("fastmqa.gpucheck: no CUDA GPU here (torch.cuda.is_available() is False). Run it on a GPU host; "
              "on a CPU machine run the test suite (README) instead.", file=sys.stderr)
        return 2
    os.environ.setdefault("MAX_JOBS", "4")
    summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "kernels": {}, "sanitizer": [], "notebooks": []}
    t0 = time.time()
    built = build_all(entries, max_workers=len(entries))
    print(f"built {len(entries)} kernels in {time.time() - t0:.0f} s", flush=True)
    for e in entries:
        err = built.get(e.name)
        rec = {"build": "ok" if err is None else f"FAIL: {str(err)[-2000:]}"}
        if err is None:
            cases = gridcheck.run_grid(e, quick=args.quick)
            rec["grid"] = {"passed": sum(c.ok for c in cases), "total": len(cases),
                           "failures": [c.__dict__ for c in cases if not c.ok][:20],
                           "worst_ratio": max((c.max_err / c.tol for c in cases if c.tol == c.tol and c.tol > 0), default=0.0)}
            print(f"{e.name}: {gridcheck.summarize(cases)}", flush=True)
            for path in e.paths:  # its other code paths, forced (num_splits = path), on the same grid
                pc = gridcheck.run_grid(e, quick=args.quick, fn=functools.partial(e, num_splits=path))
                rec[f"grid_path{path}"] = {"passed": sum(c.ok for c in pc), "total": len(pc),
                                            "failures": [c.__dict__ for c in pc if not c.ok][:20]}
                print(f"{e.name} num_splits={path}: {gridcheck.summarize(pc)}", flush=True)
            if e.backward:  # its backward kernel, gradient by gradient
                bcases = gridcheck.run_backward_grid(e, quick=args.quick)
                rec["backward_grid"] = {"passed": sum(c.ok for c in bcases), "total": len(bcases),
                                        "failures": [c.__dict__ for c in bcases if not c.ok][:20],
                                        "worst_ratio": max((c.max_err / c.tol for c in bcases if c.tol == c.tol and c.tol > 0),
                                                           default=0.0)}
                print(f"{e.name} backward ({e.backward}): {gridcheck.summarize(bcases)}", flush=True)
        else:
            print(f"{e.name}: BUILD FAILED\n{str(err)[-3000:]}", flush=True)
        summary["kernels"][e.name] = rec
    if args.fuzz:
        from .fuzz import determinism, fuzz_kernel
        for e in entries:
            if built.get(e.name) is None:
                summary["kernels"][e.name]["fuzz"] = fuzz_kernel(e, examples=args.fuzz)
                summary["kernels"][e.name]["determinism"] = determinism(e)
                print(f"{e.name}: fuzz {summary['kernels'][e.name]['fuzz']}; determinism "
                      f"{summary['kernels'][e.name]['determinism']}", flush=True)
    if not args.no_sanitizer:
        jobs = [(e.name, t) for e in entries if built.get(e.name) is None for t in args.sanitizer_tools.split(",")]
        with ThreadPoolExecutor(max_workers=6) as pool:
            for r in pool.map(lambda j: sanitize(*j), jobs):
                summary["sanitizer"].append(r)
                print(f"sanitizer {r['tool']:9s} {r['kernel']}: {'ok' if r['ok'] else 'FAIL'} ({r['seconds']} s)"
                      + ("" if r["ok"] else "\n" + r["report"]), flush=True)
    if args.notebooks:
        nbs = sorted(str(p) for p in (ROOT / "notebooks").glob("*.ipynb"))
        summary["notebooks"] = run_notebooks(nbs)
    if args.nbval:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "--nbval-lax", "-p", "no:cacheprovider", "notebooks/"],
                           cwd=ROOT, capture_output=True, text=True)
        summary["nbval"] = {"ok": p.returncode == 0, "tail": (p.stdout + p.stderr)[-2000:]}
        print("nbval:", "ok" if p.returncode == 0 else "FAIL", (p.stdout + p.stderr)[-600:], flush=True)
    ok = all(r["build"] == "ok" and r["grid"]["passed"] == r["grid"]["total"]
             and all(b["passed"] == b["total"] for b in [r.get("backward_grid", {"passed": 0, "total": 0})])
             and all(g["passed"] == g["total"] for n, g in r.items() if n.startswith("grid_path"))
             and r.get("fuzz", {"ok": True})["ok"] and r.get("determinism", {"ok": True})["ok"]
             for r in summary["kernels"].values())
    ok = ok and all(r["ok"] for r in summary["sanitizer"]) and all(r["ok"] for r in summary["notebooks"])
    ok = ok and summary.get("nbval", {"ok": True})["ok"]
    summary["ok"] = ok
    summary["seconds"] = round(time.time() - t0, 1)
    text = format_summary(summary)
    print(text)
    targets = [ROOT / "results" / "gpucheck.json"]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / "gpucheck.json")
        (Path(os.environ["OUT"]) / "gpucheck.txt").write_text(text)
    for t in targets:
        t.parent.mkdir(parents=True, exist_ok=True)
        t.write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if ok else 1


def format_summary(s) -> str:
    lines = [f"GPU check on {s['device']} (torch {s['torch']}, CUDA {s['cuda']}), {s['date']}: "
             f"{'ALL PASS' if s['ok'] else 'FAILURES'} in {s['seconds']} s"]
    for name, r in s["kernels"].items():
        g = r.get("grid")
        san = {x["tool"]: ("ok" if x["ok"] else "FAIL") for x in s["sanitizer"] if x["kernel"] == name}
        grid = f"grid {g['passed']}/{g['total']} (worst {g['worst_ratio']:.2f}x tol)" if g else "grid -"
        bg = r.get("backward_grid")
        if bg:
            grid += f"  backward grid {bg['passed']}/{bg['total']} (worst {bg['worst_ratio']:.2f}x tol)"
        for n, pg in r.items():
            if n.startswith("grid_path"):
                grid += f"  num_splits={n[len('grid_path'):]} grid {pg['passed']}/{pg['total']}"
        lines.append(f"  {name:22s} build {r['build'][:4]:4s}  {grid}"
                     + "".join(f"  {t} {v}" for t, v in san.items())
                     + (f"  fuzz {r['fuzz']['passed']}/{r['fuzz']['total']}" if "fuzz" in r else "")
                     + (f"  deterministic {'yes' if r['determinism']['ok'] else 'NO'}" if "determinism" in r else ""))
    for n in s["notebooks"]:
        lines.append(f"  notebook {n['notebook']}: {'ok' if n['ok'] else 'FAIL'} ({n['seconds']} s)")
    if "nbval" in s:
        lines.append(f"  nbval: {'ok' if s['nbval']['ok'] else 'FAIL'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
