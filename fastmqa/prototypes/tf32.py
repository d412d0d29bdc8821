"""Chapter 07 (fp32 on tensor cores) prototype: fused MQA attention in 3xTF32.

kernels/09_flash_3xtf32.cu computes fp32 attention with TF32 tensor-core products. TF32 is fp32
rounded to 10 explicit mantissa bits (11 significant bits; PTX cvt.rna.tf32.f32 rounds to nearest,
ties away from zero). A product of two TF32 numbers has at most 22 significant bits, so it is exact
in fp32; what TF32 loses is in the operands. The "3xTF32" split gets it back: each fp32 operand is
x = big + small with big = tf32(x) and small = tf32(x - big), and

    a b ~= a_small b_big + a_big b_small + a_big b_big          (a_small b_small, ~2^-22 a b, dropped)

S = Q K^T is computed so. P V splits V into three parts v1 + v2 + v3 that sum to v exactly
(v1 = tf32(v), v2 = tf32(v - v1), v3 = (v - v1) - v2) and P into p1 + p2, and sums

    P V ~= p2 v1 + p1 v3 + p1 v2 + p1 v1

in that order, so that a one-hot softmax row (p = 1 for one key, 0 for the others: inputs x1e6)
returns that key's row of v exactly: (v3 + v2) + v1 = v with no rounding.

* numpy, for the chapter: `tf32_round` (bit-exact cvt.rna), `split2`, `split3` and
  `dot_error_table` (a dot product's error in fp32, 1xTF32 and 3xTF32 against float64).
* numba.cuda: `mqa_flash_3xtf32` is `flash.mqa_flash_tiled` (the tensor-core kernel's tile
  structure) with its two tile products done in emulated 3xTF32, every value in float32.

What numba cannot express: mma.sync.m16n8k8 with tf32 operands, ldmatrix, cvt.rna.tf32.f32
(there is no TF32 type, and no bit cast that works both on a GPU and in the simulator). So the
prototype emulates the arithmetic, not the fragments: a thread computes its score or output
element as a plain fp32 loop, rounding to TF32 with Veltkamp's split in float32 (x * 8193, see
`_round11`: nearest, plus a check that sends ties away from zero as cvt.rna does). It sums each
mma's 8 products in fp32 and chains the mmas in a fresh accumulator added to the running sum
every GS k-steps of S and once per tile of P V, as the .cu kernel does; but it rounds every sum
to nearest, where the tensor cores sum their own way and truncate into the accumulator. It is
still worth having: it runs on the CPU, and it checks what the .cu kernel's accuracy rests on,
the split arithmetic (which products are kept, in which order) and the exact one-hot rows,
against float64. A non-finite x splits as (0, x) and (0, x, 0), as in the .cu kernel: it goes
into the part that only ever meets the other operand's big part, so that no product computes
0 * inf = NaN where fp32 attention gives inf.
"""
from __future__ import annotations

import math

import numpy as np
from numba import float32

from .. import sim
from ._common import run_packed_rows
from .flash import block_row

# numba's simulator swaps the module-global `cuda` while it runs a kernel, so the
# switch (fastmqa.sim) is thrown before this import and `cuda` must be a global here.
cuda = sim.cuda()

BM = 16      # query rows (i, h) per block
BN = 16      # keys per K/V tile
DMAX = 128   # largest head dim (shared and local arrays need a constant size)
COLS = DMAX // BN   # output columns per thread (a literal size for cuda.local.array)
KSTEP = 8    # the k of mma.sync.m16n8k8: products summed before they reach the accumulator
GS = 4       # k-steps of S per fresh accumulator (the .cu kernel's default; P V: one per tile)

# float32 constants: in the simulator a kernel is Python on numpy scalars, and every value must
# stay float32 there too (a Python float would be float64 on the GPU, and Veltkamp's split of a
# float64 keeps 40 bits, not 11).
_SPLITTER = np.float32(8193.0)          # 2^13 + 1: keeps 24 - 13 = 11 significant bits
_HUGE = np.float32(2.0 ** 100)          # beyond this x * 8193 may overflow: scale first
_DOWN = np.float32(2.0 ** -64)
_UP = np.float32(2.0 ** 64)
_ZERO = np.float32(0.0)
_NEG_INF = np.float32(-np.inf)


# -- numpy: TF32 rounding and the splits, for the chapter ----------------------------------

def tf32_round(x):
    """x rounded to TF32 (10 explicit mantissa bits), as PTX cvt.rna.tf32.f32: to nearest, ties
    away from zero. Works on the int32 bit pattern: add half a TF32 ulp (0x1000) to the magnitude
    bits and clear the low 13 bits (a carry into the exponent is the correct rounding up, up to
    inf). inf and NaN are returned unchanged. Returns float32 of x's shape."""
    x = np.array(x, dtype=np.float32)          # a copy, of x's shape (0-d for a scalar)
    bits = x.view(np.int32)
    mag = bits & np.int32(0x7FFFFFFF)
    sign = bits & np.int32(-0x80000000)
    rounded = ((mag + np.int32(0x1000)) & np.int32(~0x1FFF)) | sign
    out = np.where(mag < np.int32(0x7F800000), rounded, bits).view(np.float32)
    return out[()] if out.ndim == 0 else out


def split2(x):
    """(big, small) with big = tf32(x), small = tf32(x - big): both TF32, and |x - (big + small)| is
    at most 2^-22 |x| (x - big is exact in fp32 and has at most 13 significant bits; small keeps 11
    of them). For inf/NaN: (0, x) (see the module docstring)."""
    x = np.asarray(x, dtype=np.float32)
    fin = np.isfinite(x)
    big = tf32_round(x)
    with np.errstate(invalid="ignore"):
        small = np.where(fin, tf32_round(x - big), x)
    return np.where(fin, big, np.float32(0)).astype(np.float32)[()], small.astype(np.float32)[()]


def split3(x):
    """(v1, v2, v3) with v1 = tf32(x), v2 = tf32(x - v1), v3 = (x - v1) - v2: v1 and v2 are TF32,
    v3 has at most 2 significant bits (so it is TF32 too; subnormal x aside), and each step is
    exact in fp32, so (v3 + v2) + v1 == x exactly. For inf/NaN: (0, x, 0)."""
    x = np.asarray(x, dtype=np.float32)
    fin = np.isfinite(x)
    v1 = tf32_round(x)
    with np.errstate(invalid="ignore"):
        r = np.where(fin, x - v1, np.float32(0)).astype(np.float32)
    v2 = np.where(fin, tf32_round(r), x).astype(np.float32)
    v3 = np.where(fin, r - v2, np.float32(0)).astype(np.float32)
    v1 = np.where(fin, v1, np.float32(0)).astype(np.float32)
    return v1, v2, v3[()]


def dot_error_table(n=128, trials=200, seed=0):
    """Error of a length-n dot product of standard normal float32 vectors against float64:

      'fp32'     a_i b_i rounded to fp32 and summed one after another (a CUDA-core thread's loop);
      '1xTF32'   tf32(a_i) tf32(b_i) (exact in fp32): the inputs lose 13 bits;
      '3xTF32'   a_small b_big + a_big b_small + a_big b_big (the .cu kernel's S = Q K^T);
      '3xTF32 + small*small'   also a_small b_small first (what 3xTF32 leaves out).

    The TF32 rows sum as mma k-steps do: per 8 elements, each kind of product is summed in fp32
    and that sum added to the accumulator, in the order listed (this
    grouping, not the split, is why 3xTF32 can come out ahead of the sequential fp32 row). The
    error of a trial is |dot - exact| / sum_i |a_i b_i| (relative to the size of the products, so
    a sum that cancels to ~0 divides by nothing small). Returns {name: (max, mean)} over trials."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((trials, n)).astype(np.float32)
    b = rng.standard_normal((trials, n)).astype(np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    exact = (a64 * b64).sum(1)
    size = np.abs(a64 * b64).sum(1)
    (ab, as_), (bb, bs) = split2(a), split2(b)
    terms = {"fp32": [a * b], "1xTF32": [tf32_round(a) * tf32_round(b)], "3xTF32": [as_ * bb, ab * bs, ab * bb],
             "3xTF32 + small*small": [as_ * bs, as_ * bb, ab * bs, ab * bb]}
    table = {}
    for name, prods in terms.items():
        step = 1 if name == "fp32" else 8
        acc = np.zeros(trials, dtype=np.float32)
        for i0 in range(0, n, step):
            for p in prods:
                t = np.zeros(trials, dtype=np.float32)
                for i in range(i0, min(i0 + step, n)):   # float32 + float32: every sum rounds to fp32
                    t = t + p[:, i]
                acc = acc + t
        err = np.abs(acc.astype(np.float64) - exact) / size
        table[name] = (float(err.max()), float(err.mean()))
    return table


# -- numba.cuda: the splits as device functions, the kernel -----------------------------------

@cuda.jit(device=True)
def _veltkamp(x):
    """x rounded to the nearest number with 11 significant bits, a tie either way (Veltkamp):
    c = x (2^13 + 1), hi = c - (c - x), all in float32 (24 - 13 = 11 bits are left). It needs
    c rounded: an FMA contraction of c - x into fma(x, 8193, -x) would break it silently (numba's
    PTX for sm_90 keeps mul.f32, sub.f32, sub.f32 here; the products it does fuse, TF32 times
    TF32, are exact, so fusing them changes nothing)."""
    c = x * _SPLITTER
    return c - (c - x)


@cuda.jit(device=True)
def _round11(x):
    """_veltkamp with ties away from zero, as cvt.rna. r = x - hi is exact; when x lies beyond hi
    (away from zero), up = hi + 2r is the neighbour on the other side of x if and only if x was a
    tie, i.e. iff up itself has 11 bits. (Ties are common in the small parts: x - tf32(x) has at
    most 13 bits, so one in four or so of them ends in binary 10.)"""
    hi = _veltkamp(x)
    r = x - hi
    if r != _ZERO and (r > _ZERO) == (x > _ZERO):
        up = hi + (r + r)
        if _veltkamp(up) == up:
            return up
    return hi


@cuda.jit(device=True)
def _tf32(x):
    """x (float32) rounded to TF32, as cvt.rna.tf32.f32, in float32 arithmetic (numba has no bit
    cast that works both on a GPU and in the simulator). inf and NaN come back unchanged;
    |x| >= 2^100 is scaled by 2^-64 first (exact), so that x * 8193 cannot overflow. Subnormal
    x (which attention does not meet) is not rounded bit for bit as cvt.rna rounds it."""
    if abs(x) < _HUGE:
        return _round11(x)
    if x - x == _ZERO:                 # finite and huge
        return _round11(x * _DOWN) * _UP
    return x                           # inf or NaN


@cuda.jit(device=True)
def _split2(x):
    """(big, small) = (tf32(x), tf32(x - big)); (0, x) for inf/NaN (see the module docstring)."""
    if x - x != _ZERO:
        return _ZERO, x
    big = _tf32(x)
    return big, _tf32(x - big)


@cuda.jit(device=True)
def _split3(x):
    """(v1, v2, v3): v1 = tf32(x), v2 = tf32(x - v1), v3 = (x - v1) - v2, exact: (v3 + v2) + v1 = x.
    (0, x, 0) for inf/NaN."""
    if x - x != _ZERO:
        return _ZERO, x, _ZERO
    v1 = _tf32(x)
    r = x - v1
    v2 = _tf32(r)
    return v1, v2, r - v2


@cuda.jit
def mqa_flash_3xtf32_kernel(q, k, v, o, lse, scale, causal):
    # flash.mqa_flash_tiled_kernel with both tile products in 3xTF32. Thread (r, c) =
    # (threadIdx.y, threadIdx.x) of a (BM, BN) block: S[r, c] is its score, and it owns O[r, d]
    # for d = c, c + BN, ... The operands are split once, as they are stored in shared memory
    # (the .cu kernel splits each fragment after its ldmatrix: the same values). One buffer KV
    # holds K's (big, small) during S = Q K^T, then V's (v1, v2, v3) during P V (as the .cu
    # kernel loads K and V in turn), which keeps shared memory under 48 KB (43 KB).
    Qp = cuda.shared.array((2, BM, DMAX), float32)    # Q (big, small)
    KV = cuda.shared.array((3, BN, DMAX), float32)    # K (big, small, -) or V (v1, v2, v3)
    Ps = cuda.shared.array((BM, BN), float32)         # the scores, then p = exp(s - m)
    P1 = cuda.shared.array((BM, BN), float32)         # p1 = tf32(p)
    P2 = cuda.shared.array((BM, BN), float32)         # p2 = tf32(p - p1)
    alpha_s = cuda.shared.array(BM, float32)
    acc = cuda.local.array(COLS, float32)
    B, H, Sq, D = q.shape
    Skv = k.shape[1]
    c, r = cuda.threadIdx.x, cuda.threadIdx.y
    b = cuda.blockIdx.y
    valid, i, h, n_end = block_row(H, Sq, Skv, cuda.blockIdx.x * BM, r, BM, causal)
    off = Skv - Sq
    for d in range(c, D, BN):                  # the Q tile, loaded and split once
        x = q[b, h, i, d] if valid else _ZERO
        big, small = _split2(x)
        Qp[0, r, d] = big
        Qp[1, r, d] = small
    for u in range(COLS):
        acc[u] = _ZERO
    m = _NEG_INF                               # every thread of row r keeps the same m and l
    l = _ZERO
    for n0 in range(0, n_end, BN):
        for d in range(c, D, BN):              # thread (r, c) loads and splits K row r of the tile
            for rr in range(r, BN, BM):
                x = k[b, n0 + rr, d] if n0 + rr < Skv else _ZERO
                big, small = _split2(x)
                KV[0, rr, d] = big
                KV[1, rr, d] = small
        cuda.syncthreads()
        # S = Q K^T in 3xTF32, one element per thread (three mma.sync per k-step in the .cu kernel).
        j = n0 + c
        s = _NEG_INF
        if j < Skv and (not causal or j <= i + off):
            dot = _ZERO
            for g0 in range(0, D, GS * KSTEP):     # a fresh accumulator every GS k-steps ...
                chain = _ZERO
                for d0 in range(g0, min(g0 + GS * KSTEP, D), KSTEP):
                    t1, t2, t3 = _ZERO, _ZERO, _ZERO   # one k-step: three mma.sync of 8 products
                    for d in range(d0, min(d0 + KSTEP, D)):
                        a_big, a_small = Qp[0, r, d], Qp[1, r, d]
                        b_big, b_small = KV[0, c, d], KV[1, c, d]
                        t1 += a_small * b_big  # every product of two TF32 numbers is exact in fp32
                        t2 += a_big * b_small
                        t3 += a_big * b_big
                    chain += t1                # the small products first
                    chain += t2
                    chain += t3
                dot += chain                   # ... added to the running sum (a rounded FADD)
            s = dot * scale
        Ps[r, c] = s
        cuda.syncthreads()                     # every thread is done with K: V may replace it
        for d in range(c, D, BN):
            for rr in range(r, BN, BM):
                x = v[b, n0 + rr, d] if n0 + rr < Skv else _ZERO
                v1, v2, v3 = _split3(x)
                KV[0, rr, d] = v1
                KV[1, rr, d] = v2
                KV[2, rr, d] = v3
        # Row statistics (the kernel reduces over the lanes that share a row with shuffles).
        m_tile = _NEG_INF
        for cc in range(BN):
            m_tile = max(m_tile, Ps[r, cc])
        m_new = max(m, m_tile)
        m_use = m_new if m_new > _NEG_INF else _ZERO
        alpha = float32(math.exp(m - m_use))
        p = float32(math.exp(s - m_use))
        cuda.syncthreads()                     # everyone has read the scores of row r
        Ps[r, c] = p
        p1, p2 = _split2(p)
        P1[r, c] = p1
        P2[r, c] = p2
        if c == 0:
            alpha_s[r] = alpha
        cuda.syncthreads()
        row_sum = _ZERO                        # l sums p itself in fp32, not its split
        for cc in range(BN):
            row_sum += Ps[r, cc]
        l = l * alpha_s[r] + row_sum
        m = m_new
        # O = diag(alpha) O + P V on this thread's columns. Per k-step of 8 keys, four mma.sync in
        # the .cu kernel's order p2 v1, p1 v3, p1 v2, p1 v1, chained in a fresh accumulator for
        # the tile that is then added to O.
        for u in range(COLS):
            d = c + u * BN
            if d < D:
                chain = _ZERO
                for k0 in range(0, BN, KSTEP):
                    t = _ZERO
                    for cc in range(k0, k0 + KSTEP):
                        t += P2[r, cc] * KV[0, cc, d]
                    chain += t
                    for w in range(3):         # v3, v2, v1: (v3 + v2) + v1 = v exactly
                        part = 2 - w
                        t = _ZERO
                        for cc in range(k0, k0 + KSTEP):
                            t += P1[r, cc] * KV[part, cc, d]
                        chain += t
                acc[u] = acc[u] * alpha + chain
        cuda.syncthreads()                     # before the next tile overwrites KV
    if valid:
        inv = float32(1.0) / l if l != _ZERO else _ZERO
        for u in range(COLS):
            d = c + u * BN
            if d < D:
                o[b, h, i, d] = acc[u] * inv
        if c == 0:
            lse[b, h, i] = m + float32(math.log(l)) if l != _ZERO else _NEG_INF


def mqa_flash_3xtf32(q, k, v, causal=False, scale=None, return_lse=False):
    """Fused MQA with S = Q K^T and P V in emulated 3xTF32 (kernels/09_flash_3xtf32.cu's arithmetic,
    flash.mqa_flash_tiled's structure); float32 torch tensors in and out."""
    return run_packed_rows(mqa_flash_3xtf32_kernel, BM, (BN, BM), q, k, v, causal, scale, return_lse, dmax=DMAX)
