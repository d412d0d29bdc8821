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


@pytest.mark.parametrize("fn", [flash.mqa_flash, flash.mqa_flash_tiled], ids=["flash", "tiled"])
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
