"""Numerics at the edges, on the CPU: NaN and inf propagate as `fastmqa.reference` documents
(never silent zeros), rows that see no key are zeros with lse = -inf, keys past a cache
length are never read, and extreme magnitudes and scales stay finite and within the
tolerance rule against float64. For the reference and every numba prototype (simulator).
"""
import warnings

import pytest
import torch

from fastmqa import sim

sim.setup("auto", quiet=True)

from fastmqa import fuzz  # noqa: E402
from fastmqa.check import compare  # noqa: E402
from fastmqa.reference import attention_ref, mqa_attention_ref  # noqa: E402

FP32, BF16, FP64 = torch.float32, torch.bfloat16, torch.float64
NAN, INF = float("nan"), float("inf")
DTYPES = [FP32, BF16, FP64]

PROTOS = fuzz.prototype_runners()     # spec.head_dims[0]: the smallest head dim, fast in the simulator
PROTO_IDS = [n for n, _, _ in PROTOS]


def inputs(B=2, H=3, Sq=6, Skv=9, D=16, dtype=FP32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=g).to(dtype) for s in ((B, H, Sq, D), (B, 1, Skv, D), (B, 1, Skv, D)))


def sees(B, Sq, Skv, causal, lens=None):
    """(B, Sq, Skv) bool: does query row i of sequence b see key j?"""
    L = torch.tensor(lens if lens is not None else [Skv] * B).view(B, 1, 1)
    j = torch.arange(Skv).view(1, 1, Skv)
    s = (j < L).expand(B, Sq, Skv)
    if causal:
        s = s & (j <= torch.arange(Sq).view(1, Sq, 1) + (L - Sq))
    return s


def rows_nan(o):
    return torch.isnan(o).all(-1)


# -- the reference: NaN --------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_reference_nan_in_q_poisons_only_its_row(dtype, causal):
    q, k, v = inputs(Sq=6, Skv=4, dtype=dtype)       # Sq > Skv: with causal rows 0, 1 see no key
    clean, lse_clean = mqa_attention_ref(q, k, v, causal=causal, return_lse=True)
    q[1, 2, 5, 3] = NAN                                 # row (1, 2, 5) sees keys
    q[0, 0, 0, :] = NAN                                 # row (0, 0, 0): fully masked when causal
    out, lse = mqa_attention_ref(q, k, v, causal=causal, return_lse=True)
    assert rows_nan(out)[1, 2, 5] and torch.isnan(lse[1, 2, 5])
    if causal:   # a row that sees no key reads nothing: zeros and -inf whatever q holds
        assert torch.equal(out[0, 0, 0], torch.zeros_like(out[0, 0, 0])) and lse[0, 0, 0] == -INF
    else:
        assert rows_nan(out)[0, 0, 0]
    poisoned = torch.zeros_like(rows_nan(out))
    poisoned[1, 2, 5] = poisoned[0, 0, 0] = True
    assert not torch.isnan(out[~poisoned]).any()
    torch.testing.assert_close(out[~poisoned], clean[~poisoned], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_reference_nan_in_k_poisons_the_rows_that_see_it(dtype, causal):
    q, k, v = inputs(Sq=6, Skv=9, dtype=dtype)
    clean = mqa_attention_ref(q, k, v, causal=causal)
    j0 = 6
    k[1, 0, j0, 2] = NAN
    out = mqa_attention_ref(q, k, v, causal=causal)
    seen = sees(2, 6, 9, causal)[1, :, j0]               # rows of sequence 1 that see key 6
    assert rows_nan(out)[1][:, seen].all()
    untouched = torch.ones(2, 3, 6, dtype=torch.bool)
    untouched[1][:, seen] = False
    if causal:
        assert (~seen).any(), "the case must have rows that mask key j0"
    assert not torch.isnan(out[untouched]).any()        # masked by causality: k never matters
    torch.testing.assert_close(out[untouched], clean[untouched], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_nan_in_v_poisons_one_column(dtype):
    q, k, v = inputs(dtype=dtype)
    v[0, 0, 4, 7] = NAN
    out = mqa_attention_ref(q, k, v)
    assert torch.isnan(out[0, :, :, 7]).all()
    other = torch.ones_like(out, dtype=torch.bool)
    other[0, :, :, 7] = False
    assert not torch.isnan(out[other]).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_infinities(dtype):
    q, k, v = inputs(dtype=dtype)
    v1 = v.clone()
    v1[0, 0, 4, 7] = INF
    out = mqa_attention_ref(q, k, v1)
    assert (out[0, :, :, 7] == INF).all() and torch.isfinite(out[1]).all()
    v1[0, 0, 5, 7] = -INF                               # both signs seen: inf - inf = NaN
    assert torch.isnan(mqa_attention_ref(q, k, v1)[0, :, :, 7]).all()
    # An infinite score: -inf drops its key, +inf has no finite softmax (NaN row).
    q = q.abs() + 0.1
    k2 = k.clone()
    k2[0, 0, 3, :] = -INF                               # q > 0: score -inf for key 3
    out = mqa_attention_ref(q, k2, v)
    keep = [j for j in range(9) if j != 3]
    ref = mqa_attention_ref(q[:1], k[:1, :, keep], v[:1, :, keep])
    torch.testing.assert_close(out[:1], ref)             # the same keys, a different matmul shape
    k2[0, 0, 3, :] = INF                                # score +inf: NaN rows
    assert rows_nan(mqa_attention_ref(q, k2, v))[0].all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_reference_never_reads_past_seqlens(dtype, causal):
    """Garbage (NaN, inf) past each length changes nothing: the result equals the cut cache."""
    q, k, v = inputs(B=3, Sq=2, Skv=11, dtype=dtype)
    lens = [11, 4, 0]
    kg, vg = k.clone(), v.clone()
    for b, L in enumerate(lens):
        kg[b, :, L:] = NAN
        vg[b, :, L:] = INF
    seqlens = torch.tensor(lens, dtype=torch.int32)
    out, lse = mqa_attention_ref(q, kg, vg, causal=causal, seqlens=seqlens, return_lse=True)
    for b, L in enumerate(lens):
        ob, lb = mqa_attention_ref(q[b:b + 1], k[b:b + 1, :, :L], v[b:b + 1, :, :L], causal=causal, return_lse=True)
        torch.testing.assert_close(out[b:b + 1], ob, atol=0, rtol=0)
        torch.testing.assert_close(lse[b:b + 1], lb, atol=0, rtol=0)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and (lse[2] == -INF).all()


# -- the reference: fully masked rows ------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_fully_masked_rows(dtype):
    q, k, v = inputs(Sq=7, Skv=3, dtype=dtype)          # causal: rows i < 4 see no key
    out, lse = mqa_attention_ref(q, k, v, causal=True, return_lse=True)
    dead = sees(2, 7, 3, True).any(-1).logical_not()   # (B, Sq)
    assert dead[:, :4].all() and not dead[:, 4:].any()
    assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4])) and (lse[:, :, :4] == -INF).all()
    assert torch.isfinite(out[:, :, 4:]).all() and torch.isfinite(lse[:, :, 4:]).all()
    # causal and lengths: row i of sequence b sees j <= i + len_b - Sq
    q, k, v = inputs(B=3, Sq=4, Skv=10, dtype=dtype)
    lens = torch.tensor([10, 2, 0])
    out, lse = mqa_attention_ref(q, k, v, causal=True, seqlens=lens, return_lse=True)
    dead = ~sees(3, 4, 10, True, lens.tolist()).any(-1)
    assert dead.tolist() == [[False] * 4, [True, True, False, False], [True] * 4]
    d = dead.view(3, 1, 4).expand(3, 3, 4)
    assert (out[d] == 0).all() and (lse[d] == -INF).all() and torch.isfinite(lse[~d]).all()


# -- every prototype: the special cases of fastmqa.fuzz --------------------------------
KNOWN = {}  # (prototype, case) pairs known to fail, with the reason; none now


def _special_params():
    out = []
    for name, fn, spec in PROTOS:
        for which in fuzz.SPECIAL_CASES:
            marks = ()
            if (name, which) in KNOWN:
                marks = pytest.mark.xfail(strict=True, reason="reported, not ours to fix: " + KNOWN[(name, which)])
            out.append(pytest.param(name, fn, spec, which, marks=marks, id=f"{name}-{which}"))
    return out


@pytest.mark.parametrize("name,fn,spec,which", _special_params())
def test_prototype_special_case(name, fn, spec, which):
    """NaN in q/k/v reaches the rows that see it; +inf in v too; rows that see no key are
    zeros with lse = -inf; everything else passes the tolerance rule."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # the simulator's numpy warns on NaN math
        err = fuzz.check_special(fn, spec, which, "cpu", small=True)
    assert err is None, f"{name}: {err}"


@pytest.mark.parametrize("name,fn,spec", PROTOS, ids=PROTO_IDS)
def test_prototype_fully_masked_rows(name, fn, spec):
    D = spec.head_dims[0]
    if spec.kind == "decode":
        q, k, v = inputs(B=3, H=2, Sq=min(2, spec.max_sq or 1), Skv=9, D=D)
        kw = {"cache_seqlens" if "cache_seqlens" in fuzz._params(fn) else "seqlens": torch.tensor([9, 1, 0], dtype=torch.int32)}
        L = [9, 1, 0]
    else:
        q, k, v = inputs(B=1, H=2, Sq=5, Skv=2, D=D)
        kw, L = {}, None
    causal = spec.causal
    res = fn(q, k, v, causal=causal, **({"return_lse": True} if spec.returns_lse else {}), **kw)
    out, lse = res if spec.returns_lse else (res, None)
    dead = ~sees(q.shape[0], q.shape[2], k.shape[2], causal, L).any(-1)
    assert dead.any()
    d = dead.view(q.shape[0], 1, q.shape[2]).expand(q.shape[:3])
    assert (out[d] == 0).all(), f"{name}: rows that see no key must be zeros"
    assert torch.isfinite(out[~d]).all()
    if lse is not None:
        assert (lse[d] == -INF).all(), f"{name}: rows that see no key must have lse = -inf"
        assert torch.isfinite(lse[~d]).all()


# -- extreme magnitudes and scales -----------------------------------------------------
SCALES = {  # name: (factor on q, k, v; softmax scale)
    "inputs x1e6": (1e6, None), "inputs x1e-6": (1e-6, None), "scale 1e-3": (1.0, 1e-3), "scale 1e3": (1.0, 1e3),
}


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
@pytest.mark.parametrize("case", list(SCALES), ids=list(SCALES))
@pytest.mark.parametrize("causal", [False, True])
def test_reference_extreme_scales(dtype, case, causal):
    f, scale = SCALES[case]
    q, k, v = (t * f for t in inputs(dtype=FP32))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out, lse = attention_ref(q, k, v, causal=causal, scale=scale, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    r = compare(out, q, k, v, causal=causal, scale=scale)
    assert r.ok, str(r)
    # scale-free: the floor of the rule must not be what lets x1e-6 through
    assert r.rel_err <= {FP32: 1e-6, BF16: 1e-2}[dtype], f"relative error {r.rel_err:.2e}"


@pytest.mark.parametrize("name,fn,spec", PROTOS, ids=PROTO_IDS)
def test_prototype_extreme_scales(name, fn, spec):
    D = spec.head_dims[0]
    for case, (f, scale) in SCALES.items():
        Sq = min(2, spec.max_sq or 1) if spec.kind == "decode" else 3
        q, k, v = (t * f for t in inputs(B=1, H=2, Sq=Sq, Skv=9, D=D, seed=1))
        out = fn(q, k, v, causal=spec.causal, scale=scale)
        assert torch.isfinite(out).all(), f"{name} {case}: non-finite output"
        r = compare(out, q, k, v, causal=spec.causal, scale=scale)
        torch_rel = compare(attention_ref(q, k, v, causal=spec.causal, scale=scale), q, k, v,
                            causal=spec.causal, scale=scale).rel_err
        assert r.ok, f"{name} {case}: {r}"
        assert r.rel_err <= 2 * torch_rel + 1e-6, f"{name} {case}: relative error {r.rel_err:.2e} vs torch {torch_rel:.2e}"


# -- the same on the GPU, for every registry kernel -------------------------------------
def _gpu_scale_cases():
    from fastmqa import kernels
    for kern in kernels.REGISTRY:
        for dtype in kern.dtypes:
            for case in SCALES:
                if dtype == torch.float16 and case in ("inputs x1e6", "scale 1e3"):
                    continue  # past fp16's largest value (65504): no such input, and PyTorch's own fp16
                    # scores overflow at scale 1e3, so the tolerance rule has no baseline
                yield pytest.param(kern, dtype, case, id=f"{kern.name}-{str(dtype)[6:]}-{case}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kern,dtype,case", list(_gpu_scale_cases()))
def test_registry_kernel_extreme_scales(kern, dtype, case):
    """Inputs x1e6 (scores ~1e12: one-hot softmax), x1e-6 (uniform), softmax scale 1e-3 and 1e3:
    finite and within the tolerance rule. x1e6 once gave inf in every kernel whose exponent was
    a fused s * scale - m with a round-to-nearest m (see kernels/01_naive.cu)."""
    f, scale = SCALES[case]
    D = kern.head_dims[-1]
    Sq = min(2, kern.max_sq) if kern.max_sq else 37
    for causal in ((False, True) if kern.causal else (False,)):
        q, k, v = (t * f for t in inputs(B=2, H=4, Sq=Sq, Skv=70, D=D, seed=3))
        q, k, v = (t.to(device="cuda", dtype=dtype) for t in (q, k, v))
        out = kern(q, k, v, causal=causal, scale=scale)
        assert torch.isfinite(out).all(), f"{kern.name} {case} causal={causal}: non-finite output"
        r = compare(out, q, k, v, causal=causal, scale=scale)
        assert r.ok, f"{kern.name} {case} causal={causal}: {r}"
