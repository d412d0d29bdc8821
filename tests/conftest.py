"""Fixtures shared by the prototype tests (test_prototypes_*.py).

`random_qkv(B, H, Sq, Skv, D, seed)` gives seeded q (B, H, Sq, D) and k, v (B, 1, Skv, D);
`check_vs_fp64(out, lse, q, k, v, ...)` checks a prototype's output and log-sum-exp against
float64; `prototype_vs_fp64(fn, (B, H, Sq, Skv, D), causal)` does both for a prefill prototype.
Nothing here imports numba, so each test module still calls `sim.setup` first.
"""
import pytest
import torch

from fastmqa.check import assert_close
from fastmqa.reference import attention_ref


def _random_qkv(B, H, Sq, Skv, D, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Sq, D, generator=g), torch.randn(B, 1, Skv, D, generator=g),
            torch.randn(B, 1, Skv, D, generator=g))


def _check_vs_fp64(out, lse, q, k, v, causal=False, seqlens=None, what="prototype"):
    """out by the tolerance rule (fastmqa.check); lse = -inf exactly on the rows that see no key
    (causal with Sq > Skv, or a cache length 0), within 1e-5 of float64's elsewhere; those rows
    of out are zeros."""
    assert_close(out, q, k, v, causal=causal, seqlens=seqlens, what=what)
    _, lse_ref = attention_ref(q.double(), k.double(), v.double(), causal=causal, seqlens=seqlens, return_lse=True)
    masked = torch.isinf(lse_ref)
    assert torch.equal(torch.isinf(lse), masked), f"{what}: rows that see no key must have lse = -inf (and only they)"
    assert torch.allclose(lse.double()[~masked], lse_ref[~masked], atol=1e-5)
    if masked.any():  # the documented fully-masked result: zeros
        assert out[masked].abs().max() == 0, f"{what}: rows that see no key must be zeros"


def _prototype_vs_fp64(fn, shape, causal):
    B, H, Sq, Skv, D = shape
    q, k, v = _random_qkv(B, H, Sq, Skv, D, seed=B * 1000 + Sq * 10 + Skv)
    out, lse = fn(q, k, v, causal=causal, return_lse=True)
    _check_vs_fp64(out, lse, q, k, v, causal=causal, what=fn.__name__)


@pytest.fixture
def random_qkv():
    return _random_qkv


@pytest.fixture
def check_vs_fp64():
    return _check_vs_fp64


@pytest.fixture
def prototype_vs_fp64():
    return _prototype_vs_fp64
