"""Determinism: the same inputs give bitwise the same outputs, run after run.

CPU: the reference and every numba prototype (simulator). GPU host: every registry kernel via
`fastmqa.fuzz.determinism`, except a kernel whose registry entry declares
extra={"deterministic": False} (none does: the split-KV decode combines its splits in a fixed
order, so even it is bitwise reproducible).
"""
import dataclasses

import pytest
import torch

from fastmqa import sim

sim.setup("auto", quiet=True)

from fastmqa import fuzz, kernels  # noqa: E402
from fastmqa.reference import mqa_attention_ref  # noqa: E402

FP32, BF16, FP64 = torch.float32, torch.bfloat16, torch.float64

PROTOS = fuzz.prototype_runners()


def bits(t):
    return t.detach().contiguous().view(torch.uint8)


def same(a, b):
    if isinstance(a, tuple):
        return all(same(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("dtype", [FP32, BF16, FP64], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_reference_bitwise_reproducible(dtype, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 33, 64, generator=g).to(dtype)
    k = torch.randn(3, 1, 47, 64, generator=g).to(dtype)
    v = torch.randn(3, 1, 47, 64, generator=g).to(dtype)
    lens = torch.tensor([47, 5, 0], dtype=torch.int32)
    for kw in ({}, {"seqlens": lens}):
        a = mqa_attention_ref(q, k, v, causal=causal, return_lse=True, **kw)
        b = mqa_attention_ref(q, k, v, causal=causal, return_lse=True, **kw)
        assert same(a, b)


@pytest.mark.parametrize("name,fn,spec", PROTOS, ids=[p[0] for p in PROTOS])
def test_prototype_bitwise_reproducible(name, fn, spec):
    r = fuzz.determinism(spec, device="cpu", fn=fn, small=True)
    assert r["ok"] and r["expected"], [c for c in r["cases"] if not c["equal"]]


ref_impl = fuzz.reference_impl   # a correct implementation with the registry's signature


def noisy_impl(q, k, v, **kw):
    out = ref_impl(q, k, v, **{**kw, "return_lse": False})
    out = out + 1e-3 * torch.rand(out.shape, dtype=torch.float32).to(out.dtype)   # a racy kernel
    return (out, ref_impl(q, k, v, **kw)[1]) if kw.get("return_lse") else out


PREFILL = kernels.Kernel("t_prefill", "test", "prefill", "", "", head_dims=(64,), returns_lse=True)
DECODE = kernels.Kernel("t_decode", "test", "decode", "", "", head_dims=(64,), max_sq=2, returns_lse=True,
                        workspace=lambda *a: 0)


@pytest.mark.parametrize("spec", [PREFILL, DECODE], ids=["prefill", "decode"])
def test_determinism_function(spec):
    r = fuzz.determinism(spec, device="cpu", fn=ref_impl, small=True)
    assert r["ok"] and r["expected"] and r["cases"] and all(c["equal"] for c in r["cases"])
    assert {c["case"]["causal"] for c in r["cases"]} == {False, True}
    r = fuzz.determinism(spec, device="cpu", fn=noisy_impl, small=True)
    assert not r["ok"] and not any(c["equal"] for c in r["cases"])
    # a kernel declared non-deterministic is reported, not failed
    loose = dataclasses.replace(spec, extra={"deterministic": False})
    r = fuzz.determinism(loose, device="cpu", fn=noisy_impl, small=True)
    assert r["ok"] and not r["expected"] and not any(c["equal"] for c in r["cases"])
    # a crash is reported per case, and fails even a non-deterministic kernel
    r = fuzz.determinism(loose, device="cpu", fn=lambda *a, **kw: 1 / 0, small=True)
    assert not r["ok"] and all("ZeroDivisionError" in c["error"] for c in r["cases"])


def test_registry_determinism_flags_are_bools():
    for kern in kernels.REGISTRY:
        assert isinstance(kern.extra.get("deterministic", True), bool), kern.name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kern", kernels.REGISTRY, ids=lambda k: k.name)
def test_registry_kernel_bitwise_reproducible(kern):
    r = fuzz.determinism(kern)
    bad = [(c["case"], c["error"]) for c in r["cases"] if not c["equal"]]
    if not r["expected"]:
        pytest.skip(f"{kern.name} declares extra={{'deterministic': False}}; differing cases: {bad}")
    assert r["ok"], bad
