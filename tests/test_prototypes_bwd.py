"""The backward prototype (fastmqa/prototypes/flash_bwd.py) against float64 autograd, in numba's simulator.

Tiny shapes (the simulator runs every thread as a Python thread): S = 1, odd S, Sq != Skv both ways
(Sq > Skv with causal leaves rows that see no key: their gradients must be 0, not NaN), several
key tiles and query blocks, one and several head groups, with and without a gradient reaching lse.
Each of dq, dk, dv is held to the course's rule against PyTorch's own fp32 autograd error.
"""
import pytest
import torch

from fastmqa import sim

sim.setup("auto", quiet=True)

from fastmqa import check  # noqa: E402
from fastmqa.prototypes.flash_bwd import mqa_flash_bwd  # noqa: E402
from fastmqa.reference import attention_ref  # noqa: E402

# (B, H, Sq, Skv, D, groups): tiles are BM = BN = 16, so 20 rows and 17 keys are 2 tiles each.
SHAPES = [(1, 1, 1, 1, 8, 1), (2, 3, 5, 7, 8, 1), (1, 2, 7, 3, 8, 2), (1, 4, 20, 17, 16, 2)]


def _grads(q, k, v, dout, dlse, causal, dtype):
    return check.grads(lambda *a: attention_ref(*a, causal=causal, return_lse=dlse is not None),
                       q, k, v, dout, dtype, "cpu", dlse=dlse)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Sq{}Skv{}D{}G{}".format(*s))
def test_backward_prototype_vs_fp64(shape, causal):
    B, H, Sq, Skv, D, groups = shape
    g = torch.Generator().manual_seed(Sq * 31 + Skv)
    q, k, v = (torch.randn(s, generator=g) for s in ((B, H, Sq, D), (B, 1, Skv, D), (B, 1, Skv, D)))
    dout = torch.randn(B, H, Sq, D, generator=g)
    dlse = torch.randn(B, H, Sq, generator=g) if Sq > 1 else None
    out, lse = attention_ref(q, k, v, causal=causal, return_lse=True)
    ours = mqa_flash_bwd(dout, q, k, v, out, lse, dlse, causal=causal, groups=groups)
    ref = _grads(q, k, v, dout, dlse, causal, torch.float64)
    theirs = _grads(q, k, v, dout, dlse, causal, torch.float32)
    for name, a, t, r in zip(("dq", "dk", "dv"), ours, theirs, ref):
        r = r.reshape(a.shape)
        assert torch.isfinite(a).all(), f"{name} has NaN/inf"
        err = float((a.double() - r).abs().max())
        tol = check.MULTIPLE * float((t.double().reshape(a.shape) - r).abs().max()) + check.ATOL[torch.float32]
        assert err <= tol, f"{name}: {err:.3e} > {tol:.3e}"
    if causal and Sq > Skv:  # rows i < Sq - Skv see no key: their dq is exactly 0
        assert torch.all(ours[0][:, :, : Sq - Skv] == 0)


def test_backward_prototype_names_bad_arguments():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 4, 8)
    out, lse = attention_ref(q, k, k, return_lse=True)
    with pytest.raises(ValueError, match="dout must have shape"):
        mqa_flash_bwd(torch.randn(1, 2, 3, 4), q, k, k, out, lse)
    with pytest.raises(ValueError, match="groups must be a positive int"):
        mqa_flash_bwd(torch.randn_like(q), q, k, k, out, lse, groups=0)
    with pytest.raises(TypeError, match="dout has dtype"):
        mqa_flash_bwd(torch.randn_like(q).double(), q, k, k, out, lse)
