"""Chapter 03 prototype: shared memory, one K/V tile for every head of the block.

The algorithm of kernels/02_smem_tiled.cu: one thread per query row and the naive two-pass
softmax, but a block owns ROWS rows of one batch b packed i-major (row = i * H + h), so it
holds every head of a few query positions. Since MQA has a single K/V head, the block copies
a tile of TJ keys into shared memory once and all its rows use it.

Shared memory: Qs (ROWS, DMAX + 1) holds the block's q rows. Thread t reads Qs[t, d] while
its warp neighbours read Qs[t', d]; with a row stride that is a multiple of 32 words every
thread would hit the same bank, so the rows are padded by one word. Ks and Vs are read by
all threads at the same address (a broadcast), so they need no padding. numba needs constant
shared-array shapes, so they are sized for the largest head dim, DMAX = 128.
"""
from __future__ import annotations

import math

from numba import float32

from .. import sim
from ._common import run_packed_rows

# numba's simulator swaps the module-global `cuda` while it runs a kernel, so the
# switch (fastmqa.sim) is thrown before this import and `cuda` must be a global here.
cuda = sim.cuda()

ROWS = 16    # query rows (= threads) per block; the .cu kernel uses 64
TJ = 8       # keys per K/V tile; the .cu kernel uses 16
DMAX = 128   # largest head dim
LDQ = DMAX + 1   # padded row stride of Qs (a named constant: numba wants literal array shapes)


def bank_conflict_ways(row_stride_words, lanes=32, banks=32):
    """How many serial shared-memory wavefronts a warp needs when lane t reads word
    t * row_stride_words (the same column of 32 consecutive rows): the largest number of
    *different* addresses that fall in one of the 32 four-byte banks. 1 means conflict-free;
    identical addresses are a broadcast and count once."""
    per_bank = {}
    for t in range(lanes):
        addr = t * row_stride_words
        per_bank.setdefault(addr % banks, set()).add(addr)
    return max(len(a) for a in per_bank.values())


@cuda.jit
def mqa_smem_tiled_kernel(q, k, v, o, lse, scale, causal):
    # q, o: (B, H, Sq, D); k, v: (B, Skv, D); lse: (B, H, Sq)
    Qs = cuda.shared.array((ROWS, LDQ), float32)   # +1 word a row: no bank conflicts (see above)
    Ks = cuda.shared.array((TJ, DMAX), float32)
    Vs = cuda.shared.array((TJ, DMAX), float32)
    acc = cuda.local.array(DMAX, float32)
    B, H, Sq, D = q.shape
    Skv = k.shape[1]
    t = cuda.threadIdx.x
    b = cuda.blockIdx.y
    rows = H * Sq
    r0 = cuda.blockIdx.x * ROWS
    row = r0 + t                           # packed (i, h): row = i * H + h
    valid = row < rows
    i = min(row, rows - 1) // H
    h = min(row, rows - 1) % H
    off = Skv - Sq                         # bottom-right aligned causal: j <= i + off
    j_end = (min(Skv, max(0, i + off + 1)) if causal else Skv) if valid else 0
    i_last = (min(rows, r0 + ROWS) - 1) // H   # the block's last row sees the most keys
    jmax = min(Skv, max(0, i_last + off + 1)) if causal else Skv

    for e in range(t, ROWS * D, ROWS):     # stage the block's q rows, d fastest (coalesced)
        rr, d = r0 + e // D, e % D
        Qs[e // D, d] = q[b, rr % H, rr // H, d] if rr < rows else 0.0

    # Pass 1: the row maximum.
    m = -math.inf
    for j0 in range(0, jmax, TJ):
        cuda.syncthreads()                 # everyone is done with the previous tile
        for e in range(t, TJ * D, ROWS):
            jj, d = e // D, e % D
            Ks[jj, d] = k[b, j0 + jj, d] if j0 + jj < Skv else 0.0
        cuda.syncthreads()                 # the tile is complete
        for jj in range(min(TJ, j_end - j0)):
            s = 0.0
            for d in range(D):
                s += Qs[t, d] * Ks[jj, d]
            m = max(m, s * scale)

    # Pass 2: exp, sum and the weighted sum of V.
    for d in range(D):
        acc[d] = 0.0
    l = 0.0
    for j0 in range(0, jmax, TJ):
        cuda.syncthreads()
        for e in range(t, TJ * D, ROWS):
            jj, d = e // D, e % D
            inside = j0 + jj < Skv
            Ks[jj, d] = k[b, j0 + jj, d] if inside else 0.0
            Vs[jj, d] = v[b, j0 + jj, d] if inside else 0.0
        cuda.syncthreads()
        for jj in range(min(TJ, j_end - j0)):
            s = 0.0
            for d in range(D):
                s += Qs[t, d] * Ks[jj, d]
            p = math.exp(s * scale - m)
            l += p
            for d in range(D):
                acc[d] += p * Vs[jj, d]

    inv = 1.0 / l if l != 0.0 else 0.0      # a row that sees no key: zeros, lse = -inf
    if valid:
        lse[b, h, i] = m + math.log(l) if l != 0.0 else -math.inf
    cuda.syncthreads()                     # Qs is no longer needed as q: reuse it for o
    for d in range(D):
        Qs[t, d] = acc[d] * inv
    cuda.syncthreads()
    for e in range(t, ROWS * D, ROWS):     # coalesced store, d fastest
        rr, d = r0 + e // D, e % D
        if rr < rows:
            o[b, rr % H, rr // H, d] = Qs[e // D, d]


def mqa_smem_tiled(q, k, v, causal=False, scale=None, return_lse=False):
    """Run the prototype; q (B, H, Sq, D) float32 with D <= 128, k, v (B, 1, Skv, D) or (B, Skv, D)."""
    return run_packed_rows(mqa_smem_tiled_kernel, ROWS, ROWS, q, k, v, causal, scale, return_lse, DMAX)
