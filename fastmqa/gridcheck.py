"""The shape grid every kernel is checked on, against the float64 reference.

Prefill: odd S, S = 1, S not a multiple of any tile, Sq != Skv (both ways), D 64 and 128,
causal and not, every dtype the kernel supports. Decode: ragged `cache_seqlens` with
lengths 0, 1 and non-multiples of the tile, Sq from 1 to the kernel's max_sq.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .check import compare

# (B, H, Sq, Skv): small enough to check in seconds, odd enough to catch tail bugs.
PREFILL_SHAPES = [
    (1, 1, 1, 1), (1, 4, 1, 17), (2, 4, 17, 17), (1, 3, 64, 64), (2, 8, 129, 129),
    (1, 4, 100, 257), (1, 2, 257, 100), (1, 32, 128, 128), (2, 5, 33, 1000), (1, 2, 513, 513),
]
PREFILL_SHAPES_QUICK = [(1, 1, 1, 1), (2, 4, 17, 17), (1, 4, 100, 257), (1, 2, 257, 100), (2, 8, 129, 129)]

# (B, H, Sq, Smax, lengths)
DECODE_SHAPES = [
    (1, 32, 1, 1, [1]), (3, 32, 1, 300, [0, 1, 300]), (4, 8, 1, 1000, [1000, 999, 517, 64]),
    (2, 32, 4, 700, [700, 4]), (5, 16, 8, 2049, [2049, 8, 1500, 129, 33]), (1, 32, 1, 16384, [16383]),
]


@dataclass
class GridCase:
    kernel: str
    dtype: str
    B: int
    H: int
    Sq: int
    Skv: int
    D: int
    causal: bool
    ok: bool
    max_err: float
    tol: float
    message: str = ""


def _rand(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, device="cpu", dtype=torch.float32).to(device=device, dtype=dtype)


def prefill_cases(kernel, quick=False):
    shapes = PREFILL_SHAPES_QUICK if quick else PREFILL_SHAPES
    for dtype, D, causal, (B, H, Sq, Skv) in itertools.product(kernel.dtypes, kernel.head_dims, (False, True), shapes):
        if kernel.supports(dtype, D, causal, Sq) is None:
            yield dtype, D, causal, B, H, Sq, Skv, None


def decode_cases(kernel, quick=False):
    shapes = DECODE_SHAPES[:3] if quick else DECODE_SHAPES
    for dtype, D, causal, (B, H, Sq, Skv, lens) in itertools.product(kernel.dtypes, kernel.head_dims, (False, True), shapes):
        if kernel.supports(dtype, D, causal, Sq) is None:
            yield dtype, D, causal, B, H, Sq, Skv, lens


def run_grid(kernel, device="cuda", quick=False, fn=None, seed=0, verbose=False):
    """Check `kernel` (a registry entry, or any callable via fn=) over the grid.

    Returns a list of GridCase; nothing raises, so a report can show every failure."""
    fn = fn or kernel
    gen = torch.Generator().manual_seed(seed)
    cases = decode_cases(kernel, quick) if kernel.kind == "decode" else prefill_cases(kernel, quick)
    out = []
    for dtype, D, causal, B, H, Sq, Skv, lens in cases:
        q = _rand((B, H, Sq, D), dtype, device, gen)
        k = _rand((B, 1, Skv, D), dtype, device, gen)
        v = _rand((B, 1, Skv, D), dtype, device, gen)
        seqlens = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=device)
        name = str(dtype).replace("torch.", "")
        try:
            o = fn(q, k, v, causal=causal, cache_seqlens=seqlens) if seqlens is not None else fn(q, k, v, causal=causal)
            if device == "cuda":
                torch.cuda.synchronize()
            r = compare(o, q, k, v, causal=causal, seqlens=seqlens)
            case = GridCase(kernel.name, name, B, H, Sq, Skv, D, causal, r.ok, r.max_err, r.tol,
                            "" if r.ok else str(r) + (f"; lens={lens}" if lens else ""))
        except Exception as e:  # a crash is a failure of that case, reported with the rest
            case = GridCase(kernel.name, name, B, H, Sq, Skv, D, causal, False, float("nan"), float("nan"),
                            f"{type(e).__name__}: {e}")
        if verbose:
            print(("ok  " if case.ok else "FAIL"), case)
        out.append(case)
    return out


def summarize(cases) -> str:
    bad = [c for c in cases if not c.ok]
    worst = max((c.max_err / c.tol for c in cases if c.tol == c.tol and c.tol > 0), default=0.0)
    s = f"{len(cases) - len(bad)}/{len(cases)} shapes pass (worst error {worst:.2f}x of tolerance)"
    for c in bad[:5]:
        s += f"\n  FAIL {c.dtype} B={c.B} H={c.H} Sq={c.Sq} Skv={c.Skv} D={c.D} causal={c.causal}: {c.message}"
    return s


# -- the backward kernels ----------------------------------------------------------------
def run_backward_grid(kernel, device="cuda", quick=False, seed=0, verbose=False):
    """Check the gradients of `kernel`'s backward kernel over the prefill grid.

    For each shape: the forward kernel gives out and lse, the backward kernel dq, dk, dv for a
    random upstream gradient; each is compared under the tolerance rule with the float64
    autograd of the reference, against the error of PyTorch's own autograd of the reference in
    the same dtype on the same device. Returns GridCase rows named '<kernel>:dq' etc."""
    from .check import grads, rule
    from .reference import attention_ref
    gen = torch.Generator().manual_seed(seed)
    out = []
    for dtype, D, causal, B, H, Sq, Skv, _ in prefill_cases(kernel, quick):
        q = _rand((B, H, Sq, D), dtype, device, gen)
        k = _rand((B, 1, Skv, D), dtype, device, gen)
        v = _rand((B, 1, Skv, D), dtype, device, gen)
        dout = _rand((B, H, Sq, D), dtype, device, gen)
        name = str(dtype).replace("torch.", "")
        try:
            o, lse = kernel(q, k, v, causal=causal, return_lse=True)
            ours = kernel.run_backward(dout, q, k, v, o, lse, causal=causal)
            if device == "cuda":
                torch.cuda.synchronize()
            ref_fn = lambda *a: attention_ref(*a, causal=causal)
            ref = grads(ref_fn, q, k, v, dout, torch.float64, "cpu")
            theirs = grads(ref_fn, q, k, v, dout, dtype, device)
            for gname, g, t, r in zip(("dq", "dk", "dv"), ours, theirs, ref):
                c = rule(g, t, r.reshape(g.shape), dtype, what=gname)
                msg = "" if c.ok else f"{gname}: {c}" + (" NaN" if c.nan else "")
                out.append(GridCase(f"{kernel.name}:{gname}", name, B, H, Sq, Skv, D, causal, c.ok, c.max_err, c.tol, msg))
        except Exception as e:  # a crash fails the case, reported with the rest
            out.append(GridCase(f"{kernel.name}:bwd", name, B, H, Sq, Skv, D, causal, False, float("nan"),
                                float("nan"), f"{type(e).__name__}: {e}"))
        if verbose:
            for c in out[-3:]:
                print(("ok  " if c.ok else "FAIL"), c)
    return out
