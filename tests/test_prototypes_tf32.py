"""The 3xTF32 prototype (fastmqa/prototypes/tf32.py): TF32 rounding, the splits, the kernel.

numpy: tf32_round against an exact float64 rounding (11 significant bits, ties away from zero),
split2 / split3 exactness. In numba's simulator: the device-side Veltkamp rounding against
tf32_round, the kernel against float64 under the tolerance rule on a small shape grid, a
one-hot softmax (inputs x1e6) returning v's row bit for bit, and a score whose dropped
a_small b_small term shows that the emulation really runs in float32.
"""
import itertools
import warnings

import numpy as np
import pytest
import torch

from fastmqa import sim

sim.setup("auto", quiet=True)

from fastmqa.prototypes import flash, tf32  # noqa: E402

cuda = sim.cuda()   # a module global, as the simulator wants (see fastmqa/prototypes/flash.py)


def _floats(n=4000, seed=0):
    """float32 values over many binades, with the awkward ones: all-ones mantissas, powers of
    two, exact TF32 halfway points, subnormals, huge values."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 2.0 ** rng.integers(-60, 60, n)).astype(np.float32)
    bits = rng.integers(0, 2**23, n).astype(np.int32) | np.int32(0x3F800000)    # in [1, 2)
    edge = [1.0, 2.0, 0.5, np.nextafter(np.float32(2), np.float32(0)), 1 + 2**-11, 1 + 3 * 2**-11,
            1 + 2**-11 + 2**-23, 1 - 2**-24, 2.0**-130, 3 * 2.0**-140, 2.0**110 + 2.0**96, 3e38, 0.0]
    edge = np.array(edge + [-e for e in edge], dtype=np.float32)
    return np.concatenate([x, bits.view(np.float32), edge]).astype(np.float32)


def _tf32_exact(x):
    """Round-to-nearest-ties-away to 11 significant bits in float64 (exact), normals only."""
    m, e = np.frexp(x.astype(np.float64))             # x = m 2^e, 0.5 <= |m| < 1
    return (np.sign(m) * np.floor(np.abs(m) * 2.0**11 + 0.5) * 2.0 ** (e - 11)).astype(np.float32)


def _sig_bits_ok(y, bits):
    """Every finite y has at most `bits` significant bits."""
    m, _ = np.frexp(y.astype(np.float64))
    return np.all(m * 2.0**bits == np.round(m * 2.0**bits))


# -- numpy ------------------------------------------------------------------------------
def test_tf32_round_properties():
    x = _floats()
    y = tf32.tf32_round(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.all(y.view(np.int32) & 0x1FFF == 0)                     # 10 explicit mantissa bits left
    assert _sig_bits_ok(y, 11)
    np.testing.assert_array_equal(tf32.tf32_round(y), y)              # idempotent
    normal = (np.abs(x) >= np.finfo(np.float32).tiny) & (np.abs(x) < 3e38)
    assert np.all(np.abs(y[normal].astype(np.float64) - x[normal]) <= 2.0**-11 * np.abs(x[normal]))
    np.testing.assert_array_equal(y[normal], _tf32_exact(x[normal]))  # = the exact rounding
    # ties go away from zero (round-half-even would give 1 for 1 + 2^-11)
    t = np.array([1 + 2**-11, -(1 + 2**-11), 1 + 3 * 2**-11, 2.0**-20 * (1 + 2**-11)], dtype=np.float32)
    np.testing.assert_array_equal(tf32.tf32_round(t), np.array([1 + 2**-10, -(1 + 2**-10), 1 + 2**-9,
                                                                 2.0**-20 * (1 + 2**-10)], dtype=np.float32))
    # inf and NaN unchanged; a scalar gives a scalar
    s = tf32.tf32_round(np.array([np.inf, -np.inf, np.nan], dtype=np.float32))
    assert s[0] == np.inf and s[1] == -np.inf and np.isnan(s[2])
    one = tf32.tf32_round(np.float32(1 + 2**-11))
    assert isinstance(one, np.float32) and one == np.float32(1 + 2**-10)
    np.testing.assert_array_equal(tf32.tf32_round(x[::3]), y[::3])   # any layout


def test_split2_and_split3():
    x = _floats(seed=1)
    x = x[(np.abs(x) >= np.finfo(np.float32).tiny) | (x == 0)]    # normals: subnormals have fewer bits
    big, small = tf32.split2(x)
    np.testing.assert_array_equal(tf32.tf32_round(big), big)
    np.testing.assert_array_equal(tf32.tf32_round(small), small)
    res = np.abs(x.astype(np.float64) - big.astype(np.float64) - small.astype(np.float64))
    assert np.all(res <= 2.0**-22 * np.abs(x.astype(np.float64)))
    assert res.max() > 0                                              # two parts are not always exact
    v1, v2, v3 = tf32.split3(x)
    for part in (v1, v2, v3):
        assert part.dtype == np.float32
        np.testing.assert_array_equal(tf32.tf32_round(part), part)    # all three are TF32
    assert _sig_bits_ok(v3, 2)
    np.testing.assert_array_equal((v3 + v2) + v1, x)                  # exact in float32 ...
    np.testing.assert_array_equal(v1.astype(np.float64) + v2 + v3, x.astype(np.float64))   # ... and exactly
    assert np.any(v3 != 0)
    # non-finite values go whole into the part that only meets the other operand's big part
    nb, ns = tf32.split2(np.array([np.inf, np.nan], dtype=np.float32))
    assert np.all(nb == 0) and ns[0] == np.inf and np.isnan(ns[1])
    w1, w2, w3 = tf32.split3(np.array([-np.inf, np.nan], dtype=np.float32))
    assert np.all(w1 == 0) and np.all(w3 == 0) and w2[0] == -np.inf and np.isnan(w2[1])


def test_dot_error_table():
    t = tf32.dot_error_table(n=64, trials=50)
    assert set(t) >= {"fp32", "1xTF32", "3xTF32"}
    assert t["3xTF32"][0] <= 2 * t["fp32"][0] and t["1xTF32"][0] >= 100 * t["fp32"][0]
    assert all(mx >= mean >= 0 for mx, mean in t.values())


# -- the device functions, in the simulator ------------------------------------------------
@cuda.jit
def _split_kernel(x, out):
    i = cuda.grid(1)
    if i < x.shape[0]:
        out[0, i] = tf32._tf32(x[i])
        big, small = tf32._split2(x[i])
        out[1, i] = big
        out[2, i] = small
        v1, v2, v3 = tf32._split3(x[i])
        out[3, i] = v1
        out[4, i] = v2
        out[5, i] = v3


def test_device_split_matches_numpy():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(500) * 2.0 ** rng.integers(-30, 30, 500)).astype(np.float32)
    x = np.concatenate([x, np.array([1 + 2**-11, -(1 + 2**-11), 1 + 3 * 2**-11, 1 + 2**-11 + 2**-23, 1 + 3 * 2**-13, 2.0**110 + 2.0**96, -3e37, np.inf,
                                     -np.inf, np.nan], dtype=np.float32)])
    out = np.zeros((6, x.size), dtype=np.float32)
    d_out = cuda.to_device(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # the simulator's numpy warns on inf - inf
        _split_kernel[(x.size + 127) // 128, 128](cuda.to_device(x), d_out)
    out = d_out.copy_to_host()
    fin = np.isfinite(x)
    # Veltkamp's split in float32, ties sent away from zero, is tf32_round bit for bit (the small
    # parts have many ties); in float64 it would keep 40 bits and match nothing here.
    np.testing.assert_array_equal(out[0, fin], tf32.tf32_round(x[fin]))
    np.testing.assert_array_equal(out[1, fin], tf32.split2(x[fin])[0])
    np.testing.assert_array_equal(out[2, fin], tf32.split2(x[fin])[1])
    for j, ref in zip((3, 4, 5), tf32.split3(x[fin])):
        np.testing.assert_array_equal(out[j, fin], ref)
    np.testing.assert_array_equal((out[5] + out[4]) + out[3], x)
    assert out[0, -3] == np.inf and out[0, -2] == -np.inf and np.isnan(out[0, -1])
    for j in (1, 3, 5):   # big, v1, v3 are zero; small and v2 carry the inf or NaN
        assert np.all(out[j, ~fin] == 0)
    for j in (2, 4):
        np.testing.assert_array_equal(out[j, ~fin], x[~fin])


# -- the kernel ------------------------------------------------------------------------
# (B, H, Sq, Skv, D): tiles are BM = BN = 16, so Skv = 20 is two K/V tiles; Sq = 5 > Skv = 1
# with causal leaves rows that see no key.
SHAPES = [(1, 2, sq, skv, d) for d, sq, skv in itertools.product((16, 64), (1, 5), (1, 7, 20))]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Sq{}Skv{}D{}".format(*s))
def test_prototype_vs_fp64(causal, shape, prototype_vs_fp64):
    prototype_vs_fp64(tf32.mqa_flash_3xtf32, shape, causal)


@pytest.mark.parametrize("causal", [False, True])
def test_one_hot_rows_return_v_exactly(causal, random_qkv):
    """Inputs x1e6: scores ~1e12 apart, p is exactly one-hot, and (v3 + v2) + v1 = v."""
    q, k, v = (t * 1e6 for t in random_qkv(1, 2, 5, 20, 16, seed=7))
    Sq, Skv = 5, 20
    s = torch.einsum("bhid,bjd->bhij", q.double(), k[:, 0].double()) / 4.0
    if causal:
        s = s.masked_fill(torch.ones(Sq, Skv, dtype=torch.bool).tril(Skv - Sq).logical_not(), -float("inf"))
    top = s.topk(2, dim=-1)
    assert (top.values[..., 0] - top.values[..., 1]).min() > 1e3   # exp(-gap) = 0 in float32
    want = v[0, 0][top.indices[..., 0]]                             # (B, H, Sq, D): v's row at the max
    vn = v.numpy()
    assert np.any(tf32.split3(vn)[2] != 0)                          # v3 is needed ...
    big, small = tf32.split2(vn)
    assert np.any(big + small != vn)                                # ... two parts would not do
    out = tf32.mqa_flash_3xtf32(q, k, v, causal=causal)
    assert torch.equal(out, want)


def test_score_drops_small_times_small():
    """S = a_small b_big + a_big b_small + a_big b_big in float32. a = b = 1 + 3 2^-13 (big 1,
    small 3 2^-13): a b = 1 + 6 2^-13 + 9 2^-26; fp32 rounds it to 1 + 6 2^-13 + 2^-23, 3xTF32
    drops a_small b_small and gets 1 + 6 2^-13. With one key, lse is that score (scale 1)."""
    a = 1 + 3 * 2.0**-13
    q = torch.zeros(1, 1, 1, 16)
    k = torch.zeros(1, 1, 1, 16)
    q[..., 0] = a
    k[..., 0] = a
    _, lse = tf32.mqa_flash_3xtf32(q, k, k.clone(), scale=1.0, return_lse=True)
    _, lse_fp32 = flash.mqa_flash_tiled(q, k, k.clone(), scale=1.0, return_lse=True)
    assert lse.item() == 1 + 6 * 2.0**-13
    assert lse_fp32.item() == 1 + 6 * 2.0**-13 + 2.0**-23
