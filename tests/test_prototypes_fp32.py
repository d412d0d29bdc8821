"""The fp32 chapters' prototypes (shared memory, warp shuffles, cuBLAS-style three steps)
against float64, in numba's simulator.

Tiny shapes only (the simulator runs every thread as a Python thread, and a simulated warp
shuffle costs about a millisecond): S = 1, odd S, Sq != Skv both ways (Sq > Skv with causal
leaves rows that see no key), several K/V tiles and several row blocks, D = 64, causal and not.
"""
import os

import numpy as np
import pytest
import torch

from fastmqa import sim

sim.setup("auto", quiet=True)

from fastmqa.check import assert_close  # noqa: E402
from fastmqa.prototypes import _warpsim, cublas, smem_tiled, warp_shuffle  # noqa: E402

cuda = sim.cuda()  # a module global: the simulator swaps it while a kernel runs

# (B, H, Sq, Skv, D). smem_tiled: ROWS = 16, TJ = 8; warp_shuffle: R = 2 rows a warp, C = TJ = 16.
SHAPES = [(1, 1, 1, 1, 8), (1, 2, 5, 7, 16), (2, 2, 9, 3, 8), (1, 3, 4, 20, 8), (1, 1, 3, 3, 64)]
FNS = [smem_tiled.mqa_smem_tiled, warp_shuffle.mqa_warp_shuffle, cublas.mqa_cublas]


@pytest.mark.parametrize("fn", FNS, ids=["smem_tiled", "warp_shuffle", "cublas"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Sq{}Skv{}D{}".format(*s))
def test_prototype_vs_fp64(fn, causal, shape, prototype_vs_fp64):
    prototype_vs_fp64(fn, shape, causal)


def test_prototypes_take_a_scale_and_3d_kv():
    g = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    for fn in FNS:
        assert_close(fn(q, k, v, scale=0.3), q, k, v, scale=0.3, what=fn.__name__)


def test_bank_conflict_ways():
    # lane t reads row t of a row-major tile at the same column: the padding lesson
    assert smem_tiled.bank_conflict_ways(128) == 32    # D = 128, unpadded: 32-way conflict
    assert smem_tiled.bank_conflict_ways(64) == 32
    assert smem_tiled.bank_conflict_ways(129) == 1     # padded by one word: conflict-free
    assert smem_tiled.bank_conflict_ways(65) == 1
    assert smem_tiled.bank_conflict_ways(2) == 2       # stride 2: pairs of lanes share a bank
    assert smem_tiled.bank_conflict_ways(0) == 1       # everyone reads one word: a broadcast


def test_simulated_shuffles():
    if not sim.simulated():
        pytest.skip("checks the simulator's shuffles")
    assert _warpsim.install()

    @cuda.jit
    def kern(out):
        t = cuda.threadIdx.x
        lane = t % 32
        out[0, t] = cuda.shfl_xor_sync(0xFFFFFFFF, t, 1)
        out[1, t] = cuda.shfl_sync(0xFFFFFFFF, t, 5)
        out[2, t] = cuda.shfl_down_sync(0xFFFFFFFF, t, 3)
        out[3, t] = cuda.shfl_up_sync(0xFFFFFFFF, t, 3)
        x = lane
        off = 16
        while off >= 1:
            x += cuda.shfl_xor_sync(0xFFFFFFFF, x, off)
            off //= 2
        out[4, t] = x

    out = np.zeros((5, 64), dtype=np.int64)
    kern[1, 64](out)
    t = np.arange(64)
    lane = t % 32
    np.testing.assert_array_equal(out[0], t ^ 1)
    np.testing.assert_array_equal(out[1], t - lane + 5)
    np.testing.assert_array_equal(out[2], np.where(lane + 3 < 32, t + 3, t))
    np.testing.assert_array_equal(out[3], np.where(lane >= 3, t - 3, t))
    np.testing.assert_array_equal(out[4], np.full(64, sum(range(32))))


def test_reduce_scatter_leaves_key_l_over_spread_on_lane_l():
    # the warp kernel's bookkeeping: after the reduce-scatter lane l holds key l // (32 // C)
    assert 32 % warp_shuffle.C == 0 and warp_shuffle.TJ % warp_shuffle.C == 0
    B, H, Sq, Skv, D = 1, 2, 1, warp_shuffle.C, 32
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(B, H, Sq, D, generator=g), torch.randn(B, Skv, D, generator=g), torch.eye(Skv, D).unsqueeze(0)
    out = warp_shuffle.mqa_warp_shuffle(q, k, v)
    p_ref = torch.softmax((q[0, :, 0] @ k[0].T) / D ** 0.5, dim=-1)  # (H, Skv): v = I picks p out
    torch.testing.assert_close(out[0, :, 0, :Skv], p_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("C", [4, 8, 16, 32])
def test_reduce_scatter_numpy(C):
    rng = np.random.default_rng(C)
    parts = rng.normal(size=(32, C))
    held, shuffles = warp_shuffle.reduce_scatter_numpy(parts)
    np.testing.assert_allclose(held, parts.sum(0)[np.arange(32) // (32 // C)], rtol=1e-12)
    assert shuffles == C - 1 + (32 // C).bit_length() - 1   # C - 1 exchanges, then log2(32 / C) plain steps
    plain, n_plain = warp_shuffle.reduce_scatter_numpy(parts, plain=True)
    assert n_plain == 5 * C and np.allclose(plain, parts.sum(0)[None, :])


def test_setup_silences_the_low_occupancy_warning_unless_asked(monkeypatch):
    """The chapters launch tiny grids on purpose: fastmqa.sim.setup turns numba's low-occupancy
    warning off by default, and leaves a value the user set alone."""
    monkeypatch.delenv("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", raising=False)
    sim.setup(sim.mode(), quiet=True)
    assert os.environ["NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS"] == "0"
    monkeypatch.setenv("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "1")
    sim.setup(sim.mode(), quiet=True)
    assert os.environ["NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS"] == "1"
