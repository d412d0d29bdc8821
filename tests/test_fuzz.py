"""Property-based tests (hypothesis) and the fuzzer itself.

* The reference in fp64 agrees with an independent computation (PyTorch's SDPA with an
  explicit mask) and with the documented fully-masked result; in fp32/bf16 its error against
  fp64 stays within a few ulps of the scores' magnitude; every output row is a convex
  combination of the values its query sees.
* Every numba prototype, in the simulator, passes the tolerance rule on random tiny cases
  drawn by hypothesis and checked by `fastmqa.fuzz.check_case` (the GPU fuzzer's own check).
* `fastmqa.fuzz.fuzz_kernel`: reproducible, covers the edges it promises, passes a correct
  implementation and catches each of a list of deliberately broken ones.

Bounded: derandomized, few examples, tiny shapes; the whole file runs in well under a minute.
"""
import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastmqa import sim  # noqa: E402

sim.setup("auto", quiet=True)

from fastmqa import fuzz, kernels  # noqa: E402
from fastmqa.reference import attention_ref, mqa_attention_ref  # noqa: E402

FP32, BF16, FP64 = torch.float32, torch.bfloat16, torch.float64
BOUNDED = dict(derandomize=True, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# head_dims: the smallest a prototype takes (fast in the simulator), then 64 and 128 (the
# kernels' sizes; 128 is the prototypes' DMAX edge).
PROTOS = fuzz.prototype_runners()


# -- the reference ------------------------------------------------------------------
@st.composite
def ref_cases(draw):
    G = draw(st.sampled_from([1, 1, 2]))
    B = draw(st.integers(0, 3))
    Skv = draw(st.integers(0, 33))
    return dict(
        B=B, G=G, H=G * draw(st.integers(1, 3)), Sq=draw(st.integers(0, 33)), Skv=Skv,
        D=draw(st.sampled_from([1, 8, 64, 128])), causal=draw(st.booleans()),
        lens=draw(st.one_of(st.none(), st.lists(st.integers(0, Skv), min_size=B, max_size=B))),
        scale=draw(st.one_of(st.none(), st.floats(0.01, 2.0))), amp=draw(st.sampled_from([0.1, 1.0, 5.0])),
        seed=draw(st.integers(0, 2**16)))


def _inputs(c, dtype):
    g = torch.Generator().manual_seed(c["seed"])
    shapes = ((c["B"], c["H"], c["Sq"], c["D"]), (c["B"], c["G"], c["Skv"], c["D"]), (c["B"], c["G"], c["Skv"], c["D"]))
    return [(torch.randn(s, generator=g) * c["amp"]).to(dtype) for s in shapes]


def _visible(c):
    """(B, 1, Sq, Skv) bool mask of the keys each query row sees."""
    B, Sq, Skv = c["B"], c["Sq"], c["Skv"]
    L = torch.tensor(c["lens"] if c["lens"] is not None else [Skv] * B, dtype=torch.long).view(B, 1, 1, 1)
    i = torch.arange(Sq).view(1, 1, Sq, 1)
    j = torch.arange(Skv).view(1, 1, 1, Skv)
    m = (j < L).expand(B, 1, Sq, Skv)
    if c["causal"]:
        m = m & (j <= i + (L - Sq))
    return m


@settings(max_examples=60, **BOUNDED)
@given(ref_cases())
def test_reference_fp64_matches_sdpa_and_contract(c):
    q, k, v = _inputs(c, FP64)
    lens = None if c["lens"] is None else torch.tensor(c["lens"], dtype=torch.int32)
    fn = mqa_attention_ref if c["G"] == 1 else attention_ref
    out, lse = fn(q, k, v, causal=c["causal"], scale=c["scale"], seqlens=lens, return_lse=True)
    assert out.shape == q.shape and out.dtype == FP64 and lse.shape == q.shape[:3]
    vis = _visible(c)                                    # (B, 1, Sq, Skv)
    alive = vis.any(-1).expand(c["B"], c["H"], c["Sq"])  # (B, H, Sq)
    # rows that see no key: zeros and -inf
    assert (out[~alive] == 0).all() and (lse[~alive] == -math.inf).all()
    if not alive.any():
        return
    rep = c["H"] // c["G"]
    ke, ve = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    sdpa = F.scaled_dot_product_attention(q, ke, ve, attn_mask=vis, scale=c["scale"])
    torch.testing.assert_close(out[alive], sdpa[alive], rtol=1e-10, atol=1e-12)
    scale = c["scale"] if c["scale"] is not None else 1 / math.sqrt(c["D"])
    s = (q @ ke.transpose(-1, -2) * scale).masked_fill(~vis, -math.inf)
    torch.testing.assert_close(lse[alive], torch.logsumexp(s, -1)[alive], rtol=1e-10, atol=1e-12)
    # convex combination: each output lies within the range of the values its row sees
    vv = ve.unsqueeze(2).expand(c["B"], c["H"], c["Sq"], c["Skv"], c["D"])
    m = vis.unsqueeze(-1).expand_as(vv)
    hi = vv.masked_fill(~m, -math.inf).amax(3)
    lo = vv.masked_fill(~m, math.inf).amin(3)
    assert (out[alive] <= hi[alive] + 1e-12).all() and (out[alive] >= lo[alive] - 1e-12).all()


@settings(max_examples=40, **BOUNDED)
@given(ref_cases(), st.sampled_from([FP32, BF16]))
def test_reference_low_precision_error_bound(c, dtype):
    """fp32/bf16 error vs fp64 of the same (rounded) inputs <= 8 eps (1 + max|score|) max|v|."""
    q, k, v = _inputs(c, dtype)
    lens = None if c["lens"] is None else torch.tensor(c["lens"], dtype=torch.int32)
    out = attention_ref(q, k, v, causal=c["causal"], scale=c["scale"], seqlens=lens)
    ref = attention_ref(q.double(), k.double(), v.double(), causal=c["causal"], scale=c["scale"], seqlens=lens)
    assert out.dtype == dtype and out.shape == ref.shape
    if not out.numel() or not c["Skv"]:
        assert (out == 0).all()
        return
    assert torch.isfinite(out).all()
    scale = c["scale"] if c["scale"] is not None else 1 / math.sqrt(c["D"])
    smax = float((q.double() @ k.double().repeat_interleave(c["H"] // c["G"], 1).transpose(-1, -2)).abs().max()) * scale
    bound = 8 * torch.finfo(dtype).eps * (1 + smax) * float(v.double().abs().max())
    err = float((out.double() - ref).abs().max())
    assert err <= bound, f"{dtype} error {err:.3e} > bound {bound:.3e}"


# -- the prototypes -----------------------------------------------------------------
# Amplitudes stay <= 1: the simulator rounds every fp32 product and sum separately (no FMA,
# strictly sequential), so with |q|, |k| ~ 3 its scores are a few times less accurate than
# PyTorch's blocked FMA dot products and the 2x rule turns marginal (seen: 1.05x of the
# tolerance, the same error in four prototypes: the arithmetic, not an algorithm). Peaked
# softmaxes are fuzzed on the GPU (fastmqa.fuzz, amplitudes up to 2) and in test_numerics.
@st.composite
def proto_cases(draw, spec):
    decode = spec.kind == "decode"
    B = draw(st.integers(1, 2))
    Skv = draw(st.integers(1, 12))
    D = draw(st.sampled_from([spec.head_dims[0]] * 3 + list(spec.head_dims[1:])))
    case = dict(dtype="float32", D=D, causal=bool(spec.causal and draw(st.booleans())),
                scale=draw(st.one_of(st.none(), st.floats(0.05, 1.0))), num_splits=0,
                kv3d=draw(st.booleans()), strided=draw(st.booleans()), amp=draw(st.sampled_from([0.5, 1.0])),
                garbage=False, return_lse=bool(spec.returns_lse), B=B, H=draw(st.integers(1, 3)), Skv=Skv, lens=None)
    if decode:
        case.update(Sq=draw(st.integers(1, min(3, spec.max_sq or 1))),
                    lens=draw(st.lists(st.integers(0, Skv), min_size=B, max_size=B)), garbage=draw(st.booleans()))
        if spec.workspace is not None:
            case["num_splits"] = draw(st.sampled_from([0, 1, 2, 3]))
    else:
        case.update(Sq=draw(st.integers(1, 6)))
    return case


def _proto_property(name, fn, spec):
    @settings(max_examples=8, **BOUNDED)
    @given(proto_cases(spec), st.integers(0, 2**16))
    def check(case, seed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            err = fuzz.check_case(fn, case, fuzz._Draw(seed), "cpu")
        assert err is None, f"{name} on {case}: {err}"
    return check


@pytest.mark.parametrize("name,fn,spec", PROTOS, ids=[p[0] for p in PROTOS])
def test_prototype_random_cases(name, fn, spec):
    _proto_property(name, fn, spec)()


# -- fuzz_kernel itself -------------------------------------------------------------
ref_impl = fuzz.reference_impl   # a correct implementation with the registry's signature


PREFILL = kernels.Kernel("t_prefill", "test", "prefill", "", "", dtypes=(FP32, BF16), head_dims=(64, 128),
                         returns_lse=True)
DECODE = kernels.Kernel("t_decode", "test", "decode", "", "", dtypes=(FP32, BF16), head_dims=(64, 128), max_sq=4,
                        returns_lse=True, workspace=lambda *a: 0)


def test_fuzz_kernel_passes_a_correct_implementation():
    r = fuzz.fuzz_kernel(PREFILL, examples=8, seed=1, device="cpu", fn=ref_impl)
    assert r["ok"] and r["passed"] == r["total"] == 8 + len(fuzz.SPECIAL_CASES), r["failures"]
    r = fuzz.fuzz_kernel(DECODE, examples=10, seed=2, device="cpu", fn=ref_impl, small=True)
    assert r["ok"] and r["total"] == 10 + len(fuzz.SPECIAL_CASES), r["failures"]
    assert set(r) >= {"ok", "passed", "total", "failures", "seed", "seconds"}


def test_fuzz_draws_are_reproducible_and_cover_the_edges():
    def draws(spec, seed, n=300):
        d = fuzz._Draw(seed)
        return [fuzz.draw_case(spec, d) for _ in range(n)]
    assert draws(PREFILL, 3, 20) == draws(PREFILL, 3, 20) and draws(PREFILL, 3, 20) != draws(PREFILL, 4, 20)
    pre = draws(PREFILL, 0)
    for c in pre:
        assert PREFILL.supports(getattr(torch, c["dtype"]), c["D"], c["causal"], c["Sq"]) is None
    assert {c["dtype"] for c in pre} == {"float32", "bfloat16"} and {c["D"] for c in pre} == {64, 128}
    assert any(c["causal"] and c["Sq"] > c["Skv"] > 0 for c in pre)          # rows that see no key
    assert any(c["Sq"] < c["Skv"] for c in pre) and any(c["Sq"] == 1 for c in pre)
    assert any(c["Sq"] == 0 or c["Skv"] == 0 or c["B"] == 0 for c in pre)     # empty inputs
    assert any(c["Sq"] in (63, 65, 127, 129) for c in pre)                    # tile edges
    assert any(c["strided"] for c in pre) and any(c["kv3d"] for c in pre) and any(c["scale"] for c in pre)
    assert all(c["B"] * c["H"] * c["Sq"] * c["Skv"] <= fuzz.MAX_WORK for c in pre)
    dec = draws(DECODE, 0)
    lens = [L for c in dec for L in c["lens"]]
    assert 0 in lens and any(c["Skv"] in c["lens"] for c in dec) and any(c["garbage"] for c in dec)
    assert all(1 <= c["Sq"] <= DECODE.max_sq for c in dec) and any(c["num_splits"] > 1 for c in dec)


def test_fuzz_kernel_arguments():
    with pytest.raises(ValueError, match=r"examples must be an int >= 0, got -1"):
        fuzz.fuzz_kernel(PREFILL, examples=-1, device="cpu", fn=ref_impl)
    r = fuzz.fuzz_kernel(PREFILL, examples=0, device="cpu", fn=ref_impl, special=False)
    assert r == {**r, "ok": True, "passed": 0, "total": 0, "failures": []}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-machine behaviour")
def test_fuzz_kernel_without_gpu_says_so():
    with pytest.raises(RuntimeError, match=r"torch.cuda.is_available\(\) is False; pass fn= and device='cpu'"):
        fuzz.fuzz_kernel(kernels.REGISTRY[0], examples=1)
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        fuzz.determinism(kernels.REGISTRY[0])


# Deliberately broken implementations: the fuzzer must catch every one of them.
def _top_left_causal(q, k, v, causal=False, scale=None, **kw):
    if causal:   # the classic bug: causal aligned top-left (j <= i) instead of bottom-right
        Sq, Skv = q.shape[2], k.shape[-2]
        return _masked(q, k, v, scale, torch.arange(Skv).view(1, -1) <= torch.arange(Sq).view(-1, 1))
    return attention_ref(q, k, v, scale=scale)


def _masked(q, k, v, scale, mask):
    if k.dim() == 3:
        k, v = k.unsqueeze(1), v.unsqueeze(1)
    s = (q.float() @ k.float().transpose(-1, -2)) * (scale or 1 / math.sqrt(q.shape[-1]))
    s = s.masked_fill(~mask, -math.inf)
    m = s.amax(-1, keepdim=True).clamp(min=-1e30) if s.shape[-1] else s.sum(-1, keepdim=True)
    p = torch.exp(s - m)
    return ((p / p.sum(-1, keepdim=True).clamp(min=1e-30)) @ v.float()).to(q.dtype)


P = dataclasses.replace(PREFILL, returns_lse=False)   # the mutants return out only
D = dataclasses.replace(DECODE, returns_lse=False)

# name: (spec, implementation, text the fuzzer's report must contain)
MUTANTS = {
    "causal aligned top-left": (P, _top_left_causal, "FAIL: max err"),
    "cache_seqlens ignored": (D, lambda q, k, v, causal=False, scale=None, cache_seqlens=None, **kw:
                              attention_ref(q, k, v, causal=causal, scale=scale), "FAIL: max err"),
    "reads keys past the lengths (0 * NaN garbage)": (D, lambda q, k, v, causal=False, scale=None, cache_seqlens=None,
                                                      **kw: _reads_garbage(q, k, v, causal, scale, cache_seqlens),
                                                      "output has NaN"),
    "NaN turned into zeros": (P, lambda q, k, v, **kw: torch.nan_to_num(ref_impl(q, k, v, **kw), nan=0.0),
                              "NaN turned into numbers: silently wrong"),
    "explicit scale ignored": (P, lambda q, k, v, causal=False, scale=None, **kw:
                               attention_ref(q, k, v, causal=causal), "FAIL: max err"),
    "fp32 computed in bf16": (kernels.Kernel("t32", "", "prefill", "", "", head_dims=(64,)),
                              lambda q, k, v, causal=False, scale=None, **kw:
                              attention_ref(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=causal, scale=scale).float(),
                              "FAIL: max err"),
    "last key dropped": (P, lambda q, k, v, causal=False, scale=None, **kw:
                         attention_ref(q, k[..., :-1, :] if k.shape[-2] > 1 else k, v[..., :-1, :] if v.shape[-2] > 1 else v,
                                       causal=causal, scale=scale), "FAIL: max err"),
    "fully masked rows are NaN": (P, lambda q, k, v, causal=False, scale=None, **kw:
                                  _softmax_nan(q, k, v, causal, scale), "output has NaN"),
    "writes into k": (P, lambda q, k, v, **kw: _writes_k(q, k, v, **kw), "the kernel modified its inputs"),
    "lse off by 1e-2": (PREFILL, lambda q, k, v, return_lse=False, **kw:
                        (ref_impl(q, k, v, **kw), ref_impl(q, k, v, return_lse=True, **kw)[1] + 1e-2)
                        if return_lse else ref_impl(q, k, v, **kw), "lse max err"),
    "returns float32 for bf16": (P, lambda q, k, v, **kw: ref_impl(q, k, v, **kw).float(), "float32, expected"),
    "no lse when asked": (PREFILL, lambda q, k, v, return_lse=False, **kw: ref_impl(q, k, v, **kw),
                          "with return_lse=True the kernel must return (out, lse), got Tensor"),
}


def _reads_garbage(q, k, v, causal, scale, lens):
    out = attention_ref(q, k.nan_to_num(0.0), v.nan_to_num(0.0), causal=causal, scale=scale, seqlens=lens)
    return out + 0 * v.sum()                              # 0 * NaN: touches every key of the cache


def _softmax_nan(q, k, v, causal, scale):
    if k.dim() == 3:
        k, v = k.unsqueeze(1), v.unsqueeze(1)
    s = (q @ k.transpose(-1, -2)) * (scale or 1 / math.sqrt(q.shape[-1]))
    if causal:
        Sq, Skv = q.shape[2], k.shape[2]
        s = s.masked_fill(~(torch.arange(Skv).view(1, -1) <= torch.arange(Sq).view(-1, 1) + Skv - Sq), -math.inf)
    return torch.softmax(s, -1) @ v


def _writes_k(q, k, v, **kw):
    out = ref_impl(q, k, v, **kw)
    k[..., 0] = 0.0          # scribbles on its input (a kernel using k as scratch space)
    return out


@pytest.mark.parametrize("mutant", list(MUTANTS), ids=list(MUTANTS))
def test_fuzz_kernel_catches_broken_implementations(mutant):
    spec, fn, text = MUTANTS[mutant]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = fuzz.fuzz_kernel(spec, examples=16, seed=0, device="cpu", fn=fn, small=True)
    assert not r["ok"], f"the fuzzer missed: {mutant}"
    errors = [f["error"] for f in r["failures"]]
    assert any(text in e for e in errors), f"{mutant}: no failure says {text!r}; got {errors[:4]}"


# -- on the GPU host --------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kern", kernels.REGISTRY, ids=lambda k: k.name)
def test_registry_kernel_fuzz(kern):
    r = fuzz.fuzz_kernel(kern, examples=20, seed=0)
    assert r["ok"], "\n".join(f"{f['case']}: {f['error']}" for f in r["failures"])
