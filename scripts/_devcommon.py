"""What the GPU dev scripts share: a time stamp for their logs, CUDA-event timing, the lse check and
the prefill suite's inputs.

A sibling module: `python scripts/dev_X.py` puts scripts/ first on sys.path.
"""
from __future__ import annotations

import statistics
import time

import torch

T0 = time.time()  # when the dev script started (its first import of this module)


def stamp(msg):
    """Print msg after the seconds since the script started."""
    print(f"[{time.time() - T0:6.1f} s] {msg}", flush=True)


def event_median_ms(fn, n):
    """Median CUDA-event time of fn() in ms over n back-to-back runs (the caller warms up first;
    no L2 flush between runs: fastmqa.bench.Timer is the benchmark's timer, with one)."""
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ev)


def lse_check(lse, lse_ref, tol):
    """(ok, max error) of a kernel's (B, H, Sq) lse against the float64 one: -inf exactly on the
    rows that see no key, within tol elsewhere."""
    dead = torch.isinf(lse_ref)
    err = float((lse.double() - lse_ref)[~dead].abs().max()) if (~dead).any() else 0.0
    return bool(torch.equal(torch.isinf(lse) & (lse < 0), dead)) and err < tol, err


def prefill_qkv(S, D, seed=None, tokens=16384, H=32, dtype=torch.bfloat16):
    """(B, q, k, v) of the prefill suite's point: B = tokens // S sequences of S keys, MQA K/V,
    random normal from a CUDA generator seeded with `seed` (default S)."""
    B = tokens // S
    gen = torch.Generator(device="cuda").manual_seed(S if seed is None else seed)
    q = torch.randn(B, H, S, D, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(B, 1, S, D, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(B, 1, S, D, device="cuda", dtype=dtype, generator=gen)
    return B, q, k, v


def alternating_rounds(fns, rounds, timer):
    """{name: [time of each round]} of every fn in `fns` ({name: fn}), timed by `timer` in `rounds`
    rounds whose order alternates (clock drift would otherwise favour whichever runs first)."""
    times = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n].append(timer(fns[n]))
    return times


def write_rows(out, name, rows):
    """rows as out/name (JSON, with the device and torch version)."""
    import json
    from pathlib import Path
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                        "rows": rows}, indent=1))


def mqa_layer_pair(hidden, heads):
    """(name, factory) of the two MQA layers the layer dev scripts compare: ours and the SDPA one."""
    from fastmqa.layers import FastMQALayer, GQALayer
    return (("fastmqa.layer", lambda: FastMQALayer(hidden, heads, causal=True)),
            ("torch.sdpa_gqa_layer", lambda: GQALayer(hidden, heads, 1, causal=True)))


def profile_table(fn, n, sort_by, rows=14):
    """torch.profiler's table (CPU and CUDA) of n calls of fn, the GPU synchronised at the end."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows)


def parse_variants(spec):
    """'TAG:MACRO=V[;MACRO=V],...' (a dev script's --variants) -> {tag: [MACRO=V, ...]}."""
    out = {}
    for item in filter(None, spec.split(",")):
        tag, defs = item.split(":", 1)
        out[tag] = [d for d in defs.split(";") if d]
    return out


def build_with_variants(base, variants):
    """{name: kernel}: the registry entry `base` and its -D variants ({tag: defines}, named
    '<base>_<tag>'), built in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    from fastmqa import build
    with ThreadPoolExecutor(1 + len(variants)) as pool:
        fb = pool.submit(base.module)
        fv = {t: pool.submit(build.load_variant, base, t, d) for t, d in variants.items()}
        fb.result()
        return {base.name: base} | {f"{base.name}_{t}": f.result() for t, f in fv.items()}


# Ragged decode caches for checking a decode kernel's variants against the default or fp64:
# (B, H, Sq, Smax, lengths (0, 1, not a multiple of the tile), dtype, D).
RAGGED_DECODE_CASES = [(3, 32, 1, 300, [0, 1, 300], torch.bfloat16, 128),
                       (4, 8, 3, 1000, [1000, 999, 517, 64], torch.bfloat16, 128),
                       (2, 32, 1, 5000, [5000, 77], torch.float16, 64),
                       (2, 16, 2, 700, [700, 5], torch.bfloat16, 192)]
