"""Randomised and adversarial checks of registry kernels: `fuzz_kernel` and `determinism`.

`python -m fastmqa.gpucheck --fuzz N` calls both for every kernel on the GPU host, where
hypothesis need not be installed: cases are drawn with torch's own generator from a seed,
so a failure is reproduced by its seed and the case dict it reports.

fuzz_kernel(kernel, examples=50, seed=0) draws `examples` random cases the kernel supports
(every dtype, head dim and mask it declares; odd sizes and tile edges; Sq != Skv both ways;
empty B/Sq/Skv now and then; strided or 3-D K/V; explicit scales; decode: ragged
`cache_seqlens` with 0, 1 and full lengths, and NaN garbage past each length, which a kernel
must never read) and checks each with `fastmqa.check.compare` (the tolerance rule). It then
runs a few adversarial cases (`SPECIAL_CASES`): NaN and inf in q, k, v must propagate to the
rows that see them, as documented in `fastmqa.reference`, never turn into silent zeros; rows
that see no key must be zeros with lse = -inf.

determinism(kernel) runs the same inputs twice and requires bitwise-equal outputs (and lse),
unless the registry entry says extra={"deterministic": False}.

Both take fn= and device= so the CPU test suite can fuzz the reference, the numba
prototypes and deliberately broken implementations with the same code.
"""
from __future__ import annotations

import dataclasses
import inspect
import time

import torch

from .check import ATOL, MULTIPLE, compare
from .reference import attention_ref

EDGE_SIZES = (1, 2, 3, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129)
MAX_WORK = 2**21            # B*H*Sq*Skv per prefill case: the fp64 check stays well under a second
LSE_FLOOR = 1e-4            # absolute floor (nats) on top of MULTIPLE x torch's own lse error
MAX_FAILURES = 20           # failures reported in full


# -- drawing -----------------------------------------------------------------------
class _Draw:
    """Random choices from a seeded torch.Generator (CPU), reproducible on any host."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(int(seed))

    def int(self, lo, hi):                      # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=self.gen))

    def choice(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def prob(self, p):
        return float(torch.rand((), generator=self.gen)) < p

    def size(self, hi, p_edge=0.3, p_zero=0.0):
        if p_zero and self.prob(p_zero):
            return 0
        if self.prob(p_edge):
            edges = [s for s in EDGE_SIZES if s <= hi]
            return self.choice(edges)
        return self.int(1, hi)

    def randn(self, shape, dtype, device, amp=1.0):
        return (torch.randn(shape, generator=self.gen, dtype=torch.float32) * amp).to(device=device, dtype=dtype)


def _name(dtype):
    return str(dtype).replace("torch.", "")


def draw_case(kernel, d: _Draw, max_seq=300, max_cache=4096) -> dict:
    """One random case `kernel` supports: a dict of plain values (printable, reproducible)."""
    dtype = d.choice(list(kernel.dtypes))
    D = d.choice(list(kernel.head_dims))
    causal = bool(kernel.causal and d.prob(0.5))
    case = dict(dtype=_name(dtype), D=D, causal=causal, scale=None, lens=None, num_splits=0,
                kv3d=d.prob(0.3), strided=d.prob(0.3), amp=d.choice([1.0, 1.0, 0.25, 2.0]),
                garbage=False, return_lse=bool(kernel.returns_lse and d.prob(0.5)))
    if d.prob(0.2):
        case["scale"] = round(0.02 + 0.98 * float(torch.rand((), generator=d.gen)), 4)
    if kernel.kind == "decode":
        if kernel.workspace is not None:   # split-KV: its workspace holds the partial results
            case["num_splits"] = d.choice([0, 0, 1, 2, 3, 7, 16])
        B = d.int(1, 8)
        H = d.choice([1, 4, 8, 16, 32])
        Sq = d.int(1, kernel.max_sq or 1)
        Skv = d.size(max_cache, p_edge=0.2)
        lens = [d.choice([0, 1, Skv, d.int(0, Skv)]) if d.prob(0.4) else d.int(0, Skv) for _ in range(B)]
        case.update(B=B, H=H, Sq=Sq, Skv=Skv, lens=lens, garbage=d.prob(0.5))
    else:
        B = d.size(4, p_edge=0.0, p_zero=0.02)
        H = d.choice([1, 2, 3, 4, 8, 16, 32])
        Sq = d.size(max_seq, p_zero=0.03)
        Skv = d.size(max_seq, p_zero=0.03)
        while B * H * Sq * Skv > MAX_WORK and H > 1:
            H //= 2
        case.update(B=B, H=H, Sq=Sq, Skv=Skv)
    return case


def make_inputs(case: dict, d: _Draw, device):
    """q, k, v, seqlens of a case (strided views and 3-D K/V when the case says so)."""
    dtype = getattr(torch, case["dtype"])
    B, H, Sq, Skv, D, amp = case["B"], case["H"], case["Sq"], case["Skv"], case["D"], case["amp"]
    if case["strided"]:   # non-contiguous views: (B, Sq, H, D) transposed, K/V cut from a longer cache
        q = d.randn((B, Sq, H, D), dtype, device, amp).transpose(1, 2)
        k = d.randn((B, 1, Skv + 5, D), dtype, device, amp)[:, :, :Skv]
        v = d.randn((B, 1, Skv + 5, D), dtype, device, amp)[:, :, :Skv]
    else:
        q = d.randn((B, H, Sq, D), dtype, device, amp)
        k = d.randn((B, 1, Skv, D), dtype, device, amp)
        v = d.randn((B, 1, Skv, D), dtype, device, amp)
    seqlens = None
    if case["lens"] is not None:
        seqlens = torch.tensor(case["lens"], dtype=torch.int32, device=device)
        if case["garbage"]:   # what torch.empty may hold past each length: must never be read
            j = torch.arange(Skv, device=device).view(1, 1, Skv, 1)
            past = j >= seqlens.view(B, 1, 1, 1)
            k = k.masked_fill(past, float("nan"))
            v = v.masked_fill(past, float("nan"))
    if case["kv3d"]:
        k, v = k[:, 0], v[:, 0]
    return q, k, v, seqlens


# -- calling -------------------------------------------------------------------------
def _call(fn, q, k, v, case, seqlens):
    """fn(q, k, v, ...) with the keyword arguments the case uses -> (out, lse or None)."""
    kw = dict(causal=case["causal"], scale=case["scale"])
    params = _params(fn)
    if seqlens is not None:
        kw["cache_seqlens" if "cache_seqlens" in params or "seqlens" not in params else "seqlens"] = seqlens
    if case["num_splits"]:
        kw["num_splits"] = case["num_splits"]
    if case["return_lse"]:
        kw["return_lse"] = True
    res = fn(q, k, v, **kw)
    if case["return_lse"]:
        if not (isinstance(res, tuple) and len(res) == 2):
            raise TypeError(f"with return_lse=True the kernel must return (out, lse), got {type(res).__name__}")
        return res
    return res, None


def _params(fn):
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _same_bits(a, b) -> bool:
    """Bitwise equality (NaN == NaN, -0.0 != 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.detach().contiguous().view(torch.uint8), b.detach().contiguous().view(torch.uint8))


def _torch_same_dtype(q, k, v, causal, scale, seqlens, return_lse=False):
    """PyTorch's own computation in q's dtype (no TF32 for fp32), for the tolerance rule."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return attention_ref(q, k, v, causal=causal, scale=scale, seqlens=seqlens, return_lse=return_lse)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def check_lse(lse, q, k, v, causal, scale, seqlens) -> str | None:
    """None if the (B, H, Sq) log-sum-exp passes, else why not. -inf exactly on fully masked
    rows; elsewhere |lse - lse64| <= MULTIPLE x |torch lse - lse64| + LSE_FLOOR."""
    B, H, Sq = q.shape[:3]
    if tuple(lse.shape) != (B, H, Sq) or lse.dtype != torch.float32:
        return f"lse has shape {tuple(lse.shape)} dtype {_name(lse.dtype)}, expected ({B}, {H}, {Sq}) float32"
    _, ref = attention_ref(q.detach().double().cpu(), k.detach().double().cpu(), v.detach().double().cpu(),
                           causal=causal, scale=scale, return_lse=True,
                           seqlens=None if seqlens is None else seqlens.cpu())
    _, tl = _torch_same_dtype(q, k, v, causal, scale, seqlens, return_lse=True)
    got = lse.detach().double().cpu()
    masked = torch.isinf(ref) & (ref < 0)
    if not torch.equal(masked, torch.isinf(got) & (got < 0)):
        return "lse must be -inf exactly on the rows that see no key (and only there)"
    if masked.all():
        return None
    err = float((got - ref)[~masked].abs().max())
    terr = float((tl.detach().double().cpu() - ref)[~masked].abs().max())
    tol = MULTIPLE * terr + LSE_FLOOR
    if not err <= tol:
        return f"lse max err {err:.3e} > tol {tol:.3e} (= {MULTIPLE:g} x torch err {terr:.3e} + {LSE_FLOOR:g})"
    return None


def check_case(fn, case, d, device) -> str | None:
    """Run one case; None if it passes, else the reason."""
    q, k, v, seqlens = make_inputs(case, d, device)
    before = [t.clone() for t in (q, k, v)]
    out, lse = _call(fn, q, k, v, case, seqlens)
    _sync(device)
    if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype:
        got = f"{tuple(out.shape)} {_name(out.dtype)}" if isinstance(out, torch.Tensor) else type(out).__name__
        return f"output is {got}, expected {tuple(q.shape)} {case['dtype']}"
    if not all(_same_bits(a, b) for a, b in zip(before, (q, k, v))):
        return "the kernel modified its inputs"
    r = compare(out, q, k, v, causal=case["causal"], scale=case["scale"], seqlens=seqlens)
    if not r.ok:
        return str(r) + ("; output has NaN" if r.nan else f"; worst element at (b, h, i, d) = {r.where}")
    if lse is not None:
        return check_lse(lse, q, k, v, case["causal"], case["scale"], seqlens)
    return None


# -- adversarial cases: NaN, inf, fully masked rows --------------------------------
SPECIAL_CASES = ("nan_q_row", "nan_k_key", "nan_v_elem", "inf_v_elem", "fully_masked", "zero_lengths")


def _special_case(kernel, which, device, small=False):
    """(case, q, k, v, seqlens, must_nan (B,H,Sq,D) bool, must_inf, free) for one special case, or None.

    must_nan / must_inf: elements that must be NaN / +inf; free: elements the contract leaves
    unspecified (rows masked from a NaN/inf in v by causality); every other element must pass
    the tolerance rule against the fp64 reference."""
    dtype = kernel.dtypes[0]
    D = kernel.head_dims[0]
    decode = kernel.kind == "decode"
    causal = bool(kernel.causal) and which in ("nan_k_key", "nan_v_elem", "fully_masked")
    if decode:
        B, H, Sq, Skv = 3, (2 if small else 8), min(2, kernel.max_sq or 1), (90 if small else 200)
        lens = [Skv, 77, 1] if which != "zero_lengths" else [0, 50, 0]
    else:
        # Sq > Skv: with causal the first Sq - Skv rows see no key; the last row sees them all.
        B, H, Sq, Skv = (1, 2, 6, 4) if small else (2, 4, 40, 33)
        lens = None
        if which == "fully_masked" and not kernel.causal:
            return None
        if which == "zero_lengths":
            Skv = 0
    if which == "fully_masked" and decode and not kernel.causal:
        return None
    case = dict(dtype=_name(dtype), D=D, causal=causal, scale=None, lens=lens, num_splits=0, kv3d=False,
                strided=False, amp=1.0, garbage=False, return_lse=bool(kernel.returns_lse),
                B=B, H=H, Sq=Sq, Skv=Skv, special=which)
    d = _Draw(SPECIAL_CASES.index(which))
    q, k, v, seqlens = make_inputs(case, d, device)
    q, k, v = q.clone(), k.clone(), v.clone()
    # Which (b, i, j) does each query row see?  sees[b, i, j]
    j = torch.arange(Skv).view(1, 1, Skv)
    i = torch.arange(Sq).view(1, Sq, 1)
    L = torch.tensor(lens if lens is not None else [Skv] * B).view(B, 1, 1)
    sees = (j < L).expand(B, Sq, Skv)
    if causal:
        sees = sees & (j <= i + (L - Sq))
    must_nan = torch.zeros(B, H, Sq, D, dtype=torch.bool)
    must_inf = torch.zeros_like(must_nan)
    free = torch.zeros_like(must_nan)
    b0, h0, i0, j0, d0 = B - 2 if B > 1 else 0, 1, Sq - 1, min(Skv - 1, 5) if Skv else 0, 3
    if decode:
        b0, j0 = 1, 70            # sequence 1 has length 77: key 70 is inside it
    if which == "nan_q_row":
        q[b0, h0, i0] = float("nan")
        if sees[b0, i0].any():
            must_nan[b0, h0, i0] = True
    elif which in ("nan_k_key", "nan_v_elem", "inf_v_elem"):
        val = float("inf") if which == "inf_v_elem" else float("nan")
        if which == "nan_k_key":
            k[b0, 0, j0] = val
        else:
            v[b0, 0, j0, d0] = val
        seen = sees[b0, :, j0]                     # (Sq,) rows of sequence b0 that see key j0
        target = must_nan if which != "inf_v_elem" else must_inf
        if which == "nan_k_key":
            target[b0, :, seen] = True
        else:
            target[b0, :, seen, d0] = True
            free[b0, :, ~seen, d0] = True          # unspecified: 0 * NaN in a tiled p @ V
    return case, q, k, v, seqlens, must_nan, must_inf, free


def check_special(fn, kernel, which, device, small=False) -> str | None:
    made = _special_case(kernel, which, device, small)
    if made is None:
        return None
    case, q, k, v, seqlens, must_nan, must_inf, free = made
    out, lse = _call(fn, q, k, v, case, seqlens)
    _sync(device)
    o = out.detach().double().cpu()
    if not bool(torch.isnan(o[must_nan]).all()):
        return (f"{which}: {int((~torch.isnan(o[must_nan])).sum())} of {int(must_nan.sum())} elements that must be "
                f"NaN are not (NaN turned into numbers: silently wrong)")
    if not bool((o[must_inf] == float("inf")).all()):
        return f"{which}: elements that must be +inf (v has +inf at a key the row sees) are {o[must_inf][:4].tolist()}"
    ref = attention_ref(q.detach().double().cpu(), k.detach().double().cpu(), v.detach().double().cpu(),
                        causal=case["causal"], seqlens=None if seqlens is None else seqlens.cpu())
    tout = _torch_same_dtype(q, k, v, case["causal"], None, seqlens).detach().double().cpu()
    rest = ~(must_nan | must_inf | free)
    if bool(torch.isnan(o[rest]).any()):
        return f"{which}: {int(torch.isnan(o[rest]).sum())} elements that must be finite are NaN"
    if rest.any():
        err = float((o[rest] - ref[rest]).abs().max())
        tol = MULTIPLE * float((tout[rest] - ref[rest]).abs().max()) + ATOL.get(q.dtype, 1e-6)
        if not err <= tol:
            return f"{which}: max err {err:.3e} > tol {tol:.3e} on the elements the NaN/inf does not touch"
    if which in ("fully_masked", "zero_lengths"):
        _, lref = attention_ref(q.double().cpu(), k.double().cpu(), v.double().cpu(), causal=case["causal"],
                                return_lse=True, seqlens=None if seqlens is None else seqlens.cpu())
        dead = torch.isinf(lref)
        if not dead.any():
            return f"{which}: internal error, the case has no fully masked row"
        if not bool((o[dead] == 0).all()):
            return f"{which}: rows that see no key must be zeros, got max |o| {float(o[dead].abs().max()):.3e}"
        if lse is not None and not bool((lse.detach().cpu()[dead] == float("-inf")).all()):
            return f"{which}: rows that see no key must have lse = -inf"
    return None


# -- entry points ----------------------------------------------------------------------
def _resolve(kernel, fn, device):
    if fn is None:
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("fuzz runs registry kernels on a CUDA GPU and torch.cuda.is_available() is False; "
                               "pass fn= and device='cpu' to fuzz a CPU implementation (the reference, a prototype)")
        fn = kernel
    return fn


def fuzz_kernel(kernel, examples=50, seed=0, device="cuda", fn=None, special=True, small=False) -> dict:
    """Check `kernel` (a registry entry) on `examples` random supported cases plus the special
    cases. Returns {"ok", "passed", "total", "failures": [{"case", "error"}], "seed", "seconds"}.

    fn: the callable to check instead of the registry kernel (same signature; e.g. a
    prototype on device="cpu"). small: tiny shapes (sequences <= 24, caches <= 128) for
    numba's simulator. Nothing raises for a failing case: every failure is reported."""
    max_seq, max_cache = (24, 128) if small else (300, 4096)
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
        raise ValueError(f"examples must be an int >= 0, got {examples!r}")
    fn = _resolve(kernel, fn, device)
    t0 = time.time()
    d = _Draw(seed)
    failures, passed, total = [], 0, 0

    def record(case, err):
        nonlocal passed, total
        total += 1
        if err is None:
            passed += 1
        elif len(failures) < MAX_FAILURES:
            failures.append({"case": case, "error": err})

    for _ in range(examples):
        case = draw_case(kernel, d, max_seq=max_seq, max_cache=max_cache)
        try:
            err = check_case(fn, case, d, device)
        except Exception as e:  # noqa: BLE001 -- a crash is that case's failure
            err = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        record(case, err)
    if special:
        for which in SPECIAL_CASES:
            try:
                err = check_special(fn, kernel, which, device, small)
            except Exception as e:  # noqa: BLE001
                err = f"{which}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            record({"special": which}, err)
    return {"ok": passed == total, "passed": passed, "total": total, "failures": failures, "seed": seed,
            "seconds": round(time.time() - t0, 2)}


def determinism_cases(kernel, small=False):
    """(case) dicts determinism() runs: every dtype, causal and not, odd sizes; decode ragged.
    small: tiny shapes, for numba's simulator and CPU tests."""
    cases = []
    for dtype in kernel.dtypes:
        for causal in ((False, True) if kernel.causal else (False,)):
            base = dict(dtype=_name(dtype), D=kernel.head_dims[0 if small else -1], causal=causal, scale=None,
                        num_splits=0, kv3d=False, strided=False, amp=1.0, garbage=False,
                        return_lse=bool(kernel.returns_lse))
            if kernel.kind == "decode":
                S, H = (40, 2) if small else (3000, 32)
                lens = [S, 1, S // 2 + 7, 0]
                splits = (0, 7) if kernel.workspace is not None else (0,)
                for ns in splits:
                    cases.append({**base, "B": 4, "H": H, "Sq": min(2, kernel.max_sq or 1), "Skv": S,
                                  "lens": lens, "num_splits": ns})
            else:
                B, H, Sq, Skv = (1, 2, 9, 13) if small else (2, 8, 257, 300)
                cases.append({**base, "B": B, "H": H, "Sq": Sq, "Skv": Skv, "lens": None})
    return cases


def determinism(kernel, seed=0, device="cuda", fn=None, repeats=2, small=False) -> dict:
    """Run each case `repeats` times on the same inputs; outputs (and lse) must be bitwise equal.

    Returns {"ok", "expected": bool, "cases": [{"case", "equal", "error"}]}; a kernel whose
    registry entry has extra={"deterministic": False} is run and reported but not failed."""
    fn = _resolve(kernel, fn, device)
    expected = bool(getattr(kernel, "extra", {}).get("deterministic", True))
    res = []
    for i, case in enumerate(determinism_cases(kernel, small)):
        d = _Draw(seed + i)
        try:
            q, k, v, seqlens = make_inputs(case, d, device)
            runs = []
            for _ in range(repeats):
                out, lse = _call(fn, q, k, v, case, seqlens)
                _sync(device)
                runs.append((out.detach().clone(), None if lse is None else lse.detach().clone()))
            equal = all(_same_bits(runs[0][0], o) and (l is None or _same_bits(runs[0][1], l)) for o, l in runs[1:])
            res.append({"case": case, "equal": equal, "error": None})
        except Exception as e:  # noqa: BLE001
            res.append({"case": case, "equal": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    ok = all(r["equal"] for r in res) if expected else all(r["error"] is None for r in res)
    return {"ok": ok, "expected": expected, "cases": res}


# -- the numba prototypes, as fuzzable entries ----------------------------------------
def prototype_runners() -> list:
    """[(name, fn, spec)] for every prototype runner: the registry's `prototype` entries and
    every public function of fastmqa/prototypes/*.py whose first parameters are (q, k, v).

    spec is a registry-like `Kernel` describing what the runner takes: float32 only; causal,
    lse, num_splits and decode lengths as its signature says; head_dims = (the smallest it
    accepts, 8 or 16, for the simulator's sake) + the 64 and 128 its registry entry declares,
    so spec.head_dims[0] is the fast one. A registry `prototype` that does not import is left
    out (tests/test_validation.py names it). Importing the prototypes throws numba's switch
    (`fastmqa.sim`): call sim.setup() before, if needed."""
    import importlib
    import pkgutil

    from . import kernels, prototypes

    found, owners = {}, {}
    for entry in kernels.REGISTRY:
        try:
            fn = entry.prototype_fn()
        except (ImportError, AttributeError):
            continue
        if fn is not None:
            found.setdefault(f"{fn.__module__}:{fn.__name__}", fn)
            owners[f"{fn.__module__}:{fn.__name__}"] = entry
    for info in pkgutil.iter_modules(prototypes.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{prototypes.__name__}.{info.name}")
        for attr, obj in vars(mod).items():
            if attr.startswith("_") or not inspect.isfunction(obj) or obj.__module__ != mod.__name__:
                continue
            if list(inspect.signature(obj).parameters)[:3] == ["q", "k", "v"]:
                found.setdefault(f"{mod.__name__}:{attr}", obj)
    return [(key.split(".")[-1], fn, _prototype_spec(key, fn, owners.get(key))) for key, fn in sorted(found.items())]


def _prototype_spec(key, fn, entry):
    from .kernels import Kernel
    params = _params(fn)
    kind = entry.kind if entry is not None else ("decode" if {"seqlens", "cache_seqlens"} & params else "prefill")
    big = tuple(d for d in (64, 128) if entry is None or d in entry.head_dims)
    spec = Kernel(key, f"prototype {key}", kind, "", entry.chapter if entry else "", dtypes=(torch.float32,),
                  head_dims=(8, 16) + big, causal="causal" in params,
                  max_sq=(entry.max_sq if entry is not None and entry.max_sq else (1 if kind == "decode" else None)),
                  returns_lse="return_lse" in params,
                  workspace=(lambda *a: 0) if "num_splits" in params else None)
    small = _smallest_head_dim(spec, fn)
    return dataclasses.replace(spec, head_dims=(small,) + tuple(d for d in big if d > small))


def _smallest_head_dim(spec, fn) -> int:
    """The smallest of spec.head_dims the runner accepts (one tiny call each)."""
    for D in spec.head_dims:
        q = torch.zeros(1, 1, 1, D)
        k = torch.zeros(1, 1, D)
        kw = {"cache_seqlens" if "cache_seqlens" in _params(fn) else "seqlens": torch.ones(1, dtype=torch.int32)} \
            if spec.kind == "decode" else {}
        try:
            fn(q, k, k.clone(), **kw)
            return D
        except (ValueError, TypeError):
            continue
    raise ValueError(f"prototype {spec.name} accepts none of the head dims {spec.head_dims}")


def reference_impl(q, k, v, causal=False, scale=None, cache_seqlens=None, num_splits=0, return_lse=False):
    """A correct implementation with the registry's call signature (the reference in q's
    dtype): the control that fuzz_kernel and determinism must pass."""
    r = attention_ref(q, k, v, causal=causal, scale=scale, seqlens=cache_seqlens, return_lse=return_lse)
    return (r[0], r[1].float()) if return_lse else r
