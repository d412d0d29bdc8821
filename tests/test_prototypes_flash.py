"""The flash prototypes (fastmqa/prototypes/flash.py) against float64, in numba's simulator.

Tiny shapes only (the simulator runs every thread as a Python thread): odd S, S = 1,
Sq != Skv both ways (Sq > Skv with causal leaves rows that see no key), causal and not,
one shape spanning several K/V tiles and several row blocks. Plus the online-softmax
rescaling rule against the two-pass softmax.
"""
import math

import numpy as np
import pytest

from fastmqa import sim

sim.setup("auto", quiet=True)

from fastmqa.prototypes import flash  # noqa: E402

# (B, H, Sq, Skv, D): tiles are BM = BN = 16, so 37 keys is 3 tiles and H * Sq = 34 rows is 3 blocks.
SHAPES = [(1, 1, 1, 1, 8), (1, 3, 5, 37, 16), (2, 2, 17, 9, 8), (1, 2, 17, 33, 8), (1, 5, 3, 3, 16)]


@pytest.mark.parametrize("fn", [flash.mqa_flash, flash.mqa_flash_tiled, flash.mqa_flash_pipelined],
                         ids=["flash", "tiled", "pipelined"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Sq{}Skv{}D{}".format(*s))
def test_prototype_vs_fp64(fn, causal, shape, prototype_vs_fp64):
    prototype_vs_fp64(fn, shape, causal)


@pytest.mark.parametrize("tile", [1, 3, 8, 50])
def test_online_softmax_matches_two_pass(tile):
    rng = np.random.default_rng(tile)
    s = rng.normal(scale=4.0, size=(6, 50))
    s[0, :] = -np.inf          # a row that sees no key
    s[1, 20:] = -np.inf        # a row whose later tiles are all masked
    s[2, :10] = -np.inf        # a row whose first tile is all masked
    m, l, steps = flash.online_softmax_stats(s, tile)
    assert len(steps) == math.ceil(50 / tile)
    with np.errstate(invalid="ignore"):
        m2 = s.max(-1)
        l2 = np.exp(s - np.where(np.isfinite(m2), m2, 0.0)[:, None]).sum(-1)
    np.testing.assert_array_equal(m, m2)
    np.testing.assert_allclose(l, l2, rtol=1e-12)
    assert l[0] == 0 and m[0] == -np.inf
    # The running max never decreases, and every intermediate l is the two-pass sum of the prefix.
    for n, (mi, li) in enumerate(steps):
        pre = s[:, :(n + 1) * tile]
        with np.errstate(invalid="ignore"):
            mp = pre.max(-1)
            lp = np.exp(pre - np.where(np.isfinite(mp), mp, 0.0)[:, None]).sum(-1)
        np.testing.assert_allclose(li, lp, rtol=1e-12)


def test_pipelined_equals_tiled_and_sees_every_tile():
    """The loop rotation changes when each product runs, not what it adds: the pipelined prototype
    matches the tiled one to rounding, on rows of 1 to 4 tiles (the prologue and epilogue alone,
    and the steady state), lse included."""
    import torch
    g = torch.Generator().manual_seed(3)
    for Skv in (5, 16, 17, 64):
        q, k, v = torch.randn(1, 2, 9, 8, generator=g), torch.randn(1, 1, Skv, 8, generator=g), torch.randn(1, 1, Skv, 8, generator=g)
        for causal in (False, True):
            o1, l1 = flash.mqa_flash_tiled(q, k, v, causal=causal, return_lse=True)
            o2, l2 = flash.mqa_flash_pipelined(q, k, v, causal=causal, return_lse=True)
            assert torch.allclose(o1, o2, atol=1e-6, rtol=1e-5) and torch.equal(torch.isinf(l1), torch.isinf(l2))
            fin = torch.isfinite(l1)
            assert torch.allclose(l1[fin], l2[fin], atol=1e-6)
