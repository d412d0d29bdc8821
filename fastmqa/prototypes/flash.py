"""Chapters 06 and 07 prototypes: fused attention with an online softmax, MQA-packed.

Two numba.cuda kernels, both simulator-friendly at tiny sizes:

* `mqa_flash` (the algorithm of kernels/05_flash_fp32.cu, simplified): one block owns BM
  query rows of one batch b. The rows are (i, h) pairs packed i-major, row = i * H + h, so a
  block holds every head of a few query positions: since MQA has one K/V head, one K/V tile
  in shared memory serves all of them. One thread per row keeps a running max m, a running
  sum l and an unnormalised output acc, rescaled by exp(m_old - m_new) whenever m grows. The
  scores are never written anywhere.
* `mqa_flash_tiled` (the shape of kernels/06_flash_mma.cu): the same algorithm written as
  tile algebra. S = Q K^T is a (BM, BN) tile product where thread (r, c) computes S[r, c]
  (the tensor-core kernel does this with mma.sync), each thread owns a strided slice of its
  row of O (as an mma accumulator fragment does), and P = exp(S - m) is multiplied by the V
  tile. numba has no tensor-core intrinsics (no mma.sync, no ldmatrix), so this fp32 version
  is the prototype of the tensor-core kernel.

* `mqa_flash_pipelined` (the consumer loop of kernels/08_flash_wgmma.cu's warp-specialised
  kernel): the tiled algorithm with its loop rotated as FlashAttention-3 rotates it. Iteration t
  computes S_t = Q K_t^T *and* O += P_{t-1} V_{t-1} (the tensor cores run both; the softmax of
  tile t runs under the second), then rescales O by tile t's alpha; a prologue does tile 0's
  scores and softmax, an epilogue the last P V. K, V and P live in two buffers each, as the
  stage ring and P's registers do.

`online_softmax_stats` and `online_attention_row` are the rescaling rule in numpy, for checking
it against the two-pass softmax; `mma_owner`, `ldmatrix_owner`, `ldmatrix_wavefronts` and
`causal_tile_efficiency` are the layout arithmetic of chapter 07 in numpy.
"""
from __future__ import annotations

import math

import numpy as np
from numba import float32

from .. import sim
from ._common import run_packed_rows

# numba's simulator swaps the module-global `cuda` while it runs a kernel, so the
# switch (fastmqa.sim) is thrown before this import and `cuda` must be a global here.
cuda = sim.cuda()

BM = 16      # query rows (i, h) per block
BN = 16      # keys per K/V tile
DMAX = 128   # largest head dim (shared and local arrays need a constant size)
COLS = DMAX // BN   # output columns per thread in the tile prototype: a module constant, since
                    # numba on a real GPU needs a literal size for cuda.local.array


def online_softmax_stats(s, tile):
    """Running max m and sum l of exp(s - m) over the last axis, one tile of keys at a time.

    Returns (m, l, steps) where steps lists (m, l) after each tile: the two-pass softmax has
    m = s.max(-1) and l = exp(s - m).sum(-1); the online rule must end at the same numbers."""
    s = np.asarray(s, dtype=np.float64)
    m = np.full(s.shape[:-1], -np.inf)
    l = np.zeros(s.shape[:-1])
    steps = []
    for n0 in range(0, s.shape[-1], tile):
        blk = s[..., n0:n0 + tile]
        m_new = np.maximum(m, blk.max(-1))
        m_use = np.where(np.isfinite(m_new), m_new, 0.0)   # a row masked so far stays at l = 0
        l = l * np.exp(m - m_use) + np.exp(blk - m_use[..., None]).sum(-1)
        m = m_new
        steps.append((m.copy(), l.copy()))
    return m, l, steps


def online_attention_row(s, v, tile):
    """One query row in numpy: out = softmax(s) @ v computed tile by tile with the online rule
    (the unnormalised output is rescaled with l), returning (out, m, l)."""
    s, v = np.asarray(s, dtype=np.float64), np.asarray(v, dtype=np.float64)
    m, l, acc = -np.inf, 0.0, np.zeros(v.shape[1])
    for n0 in range(0, len(s), tile):
        m_new = max(m, s[n0:n0 + tile].max())
        p = np.exp(s[n0:n0 + tile] - m_new)
        alpha = np.exp(m - m_new)
        l, acc, m = l * alpha + p.sum(), acc * alpha + p @ v[n0:n0 + tile], m_new
    return acc / l, m, l


# -- chapter 07: what mma.sync and ldmatrix put in which lane (numpy tables) ---------------

def mma_owner(operand):
    """For mma.sync.m16n8k16 (16-bit inputs, fp32 accumulators): the lane and register that hold
    each element. operand 'a' is the 16x16 A tile (row, k), 'b' the 16x8 B tile (k, n), 'c' the
    16x8 accumulator (row, n). Returns (lane, reg) integer arrays of the operand's shape; a 32-bit
    A or B register holds two 16-bit elements, the lower k in its low half."""
    g = lambda x: x % 8                                           # position inside an 8x8 block
    if operand == "a":
        r, k = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
        return 4 * g(r) + g(k) // 2, r // 8 + 2 * (k // 8)
    if operand == "b":
        k, n = np.meshgrid(np.arange(16), np.arange(8), indexing="ij")
        return 4 * n + g(k) // 2, k // 8
    if operand == "c":
        r, n = np.meshgrid(np.arange(16), np.arange(8), indexing="ij")
        return 4 * g(r) + n // 2, 2 * (r // 8) + n % 2
    raise ValueError(f"operand must be 'a', 'b' or 'c', got {operand!r}")


def ldmatrix_owner(trans=False):
    """Lane that receives element (row, col) of one 8x8 matrix of 16-bit values that ldmatrix
    reads from 8 row addresses (row-major in shared memory); .trans hands out the transpose."""
    r, c = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    return 4 * c + r // 2 if trans else 4 * r + c // 2


def ldmatrix_wavefronts(row_bytes, swizzle, chunk=0):
    """Shared-memory wavefronts for one 8x8 matrix of an ldmatrix: 8 rows (0..7) of a tile with
    `row_bytes` per row, each giving the 16-byte chunk `chunk`, stored at chunk ^ (row % 8) when
    `swizzle`. 128 bytes per wavefront: 8 chunks in different 16-byte bank groups take one."""
    groups = [((r * row_bytes + 16 * ((chunk ^ (r % 8)) if swizzle else chunk)) // 16) % 8 for r in range(8)]
    return max(groups.count(x) for x in set(groups))


def causal_tile_efficiency(S, H, BM=128, BN=64, packing="imajor"):
    """Share of the computed score tiles' entries that a causal mask keeps (Sq = Skv = S, one
    batch). 'imajor': block rows are (i, h) pairs, row = i * H + h (this course); 'hmajor': a
    block holds BM consecutive queries of one head (FlashAttention-2 with expanded K/V)."""
    useful, computed = 0, 0
    for m0 in range(0, H * S, BM):
        rows = range(m0, min(m0 + BM, H * S))
        i = [(r // H) if packing == "imajor" else (r % S) for r in rows]
        tiles = -(-(max(i) + 1) // BN)
        useful += sum(x + 1 for x in i)
        computed += BM * tiles * BN
    return useful / computed


@cuda.jit
def mqa_flash_kernel(q, k, v, o, lse, scale, causal):
    # q, o: (B, H, Sq, D); k, v: (B, Skv, D); lse: (B, H, Sq)
    Ks = cuda.shared.array((BN, DMAX), float32)
    Vs = cuda.shared.array((BN, DMAX), float32)
    acc = cuda.local.array(DMAX, float32)
    s = cuda.local.array(BN, float32)
    B, H, Sq, D = q.shape
    Skv = k.shape[1]
    t = cuda.threadIdx.x
    b = cuda.blockIdx.y
    m0 = cuda.blockIdx.x * BM
    row = m0 + t                       # packed (i, h): row = i * H + h
    valid = row < H * Sq
    i = min(row, H * Sq - 1) // H
    h = min(row, H * Sq - 1) % H
    off = Skv - Sq                     # bottom-right aligned causal: j <= i + off
    # Keys the whole block needs: the last row of the block sees the most.
    i_last = min(Sq - 1, (m0 + BM - 1) // H)
    n_end = min(Skv, max(0, i_last + off + 1)) if causal else Skv
    j_end = min(Skv, max(0, i + off + 1)) if causal else Skv
    for d in range(D):
        acc[d] = 0.0
    m = -math.inf
    l = 0.0
    for n0 in range(0, n_end, BN):
        for e in range(t, BN * D, BM):         # all threads load the tile together
            jj, d = e // D, e % D
            inside = n0 + jj < Skv
            Ks[jj, d] = k[b, n0 + jj, d] if inside else 0.0
            Vs[jj, d] = v[b, n0 + jj, d] if inside else 0.0
        cuda.syncthreads()
        if valid:
            m_tile = -math.inf
            for jj in range(BN):
                s[jj] = -math.inf
                if n0 + jj < j_end:
                    dot = 0.0
                    for d in range(D):
                        dot += q[b, h, i, d] * Ks[jj, d]
                    s[jj] = dot * scale
                    # a NaN score must win the max (Python's max drops it): NaN inputs give NaN rows
                    m_tile = s[jj] if (s[jj] != s[jj] or s[jj] > m_tile) else m_tile
            m_new = m_tile if (m_tile != m_tile or m_tile > m) else m
            if m_new != -math.inf:             # else the row has seen no key yet
                alpha = math.exp(m - m_new)    # rescale what was summed under the old max
                l *= alpha
                for d in range(D):
                    acc[d] *= alpha
                for jj in range(BN):
                    p = math.exp(s[jj] - m_new)
                    l += p
                    for d in range(D):
                        acc[d] += p * Vs[jj, d]
                m = m_new
        cuda.syncthreads()                     # before the next tile overwrites Ks, Vs
    if valid:
        inv = 1.0 / l if l != 0.0 else 0.0      # a row that saw no key: zeros, lse = -inf
        for d in range(D):
            o[b, h, i, d] = acc[d] * inv
        lse[b, h, i] = m + math.log(l) if l != 0.0 else -math.inf


@cuda.jit
def mqa_flash_tiled_kernel(q, k, v, o, lse, scale, causal):
    # Thread (r, c) = (threadIdx.y, threadIdx.x) of a (BM, BN) block: S[r, c] is its score,
    # and it owns O[r, d] for d = c, c + BN, ... (a strided fragment of row r).
    Qs = cuda.shared.array((BM, DMAX), float32)
    Ks = cuda.shared.array((BN, DMAX), float32)
    Vs = cuda.shared.array((BN, DMAX), float32)
    Ps = cuda.shared.array((BM, BN), float32)
    alpha_s = cuda.shared.array(BM, float32)
    acc = cuda.local.array(COLS, float32)
    B, H, Sq, D = q.shape
    Skv = k.shape[1]
    c, r = cuda.threadIdx.x, cuda.threadIdx.y
    b = cuda.blockIdx.y
    m0 = cuda.blockIdx.x * BM
    row = m0 + r
    valid = row < H * Sq
    i = min(row, H * Sq - 1) // H
    h = min(row, H * Sq - 1) % H
    off = Skv - Sq
    i_last = min(Sq - 1, (m0 + BM - 1) // H)
    n_end = min(Skv, max(0, i_last + off + 1)) if causal else Skv
    for d in range(c, D, BN):                  # the Q tile, loaded once
        Qs[r, d] = q[b, h, i, d] if valid else 0.0
    for u in range(COLS):
        acc[u] = 0.0
    m = -math.inf                              # every thread of row r keeps the same m and l
    l = 0.0
    for n0 in range(0, n_end, BN):
        for d in range(c, D, BN):              # thread (r, c) loads K/V row r of the tile
            for rr in range(r, BN, BM):
                inside = n0 + rr < Skv
                Ks[rr, d] = k[b, n0 + rr, d] if inside else 0.0
                Vs[rr, d] = v[b, n0 + rr, d] if inside else 0.0
        cuda.syncthreads()
        # S = Q K^T, one element per thread (the mma.sync of the tensor-core kernel).
        j = n0 + c
        s = -math.inf
        if j < Skv and (not causal or j <= i + off):
            dot = 0.0
            for d in range(D):
                dot += Qs[r, d] * Ks[c, d]
            s = dot * scale
        Ps[r, c] = s
        cuda.syncthreads()
        # Row statistics (the kernel reduces over the lanes that share a row with shuffles).
        m_tile = -math.inf
        for cc in range(BN):
            m_tile = max(m_tile, Ps[r, cc])
        m_new = max(m, m_tile)
        m_use = m_new if m_new > -math.inf else 0.0
        alpha = math.exp(m - m_use)
        p = math.exp(s - m_use)
        cuda.syncthreads()                     # everyone has read the scores of row r
        Ps[r, c] = p
        if c == 0:
            alpha_s[r] = alpha
        cuda.syncthreads()
        row_sum = 0.0
        for cc in range(BN):
            row_sum += Ps[r, cc]
        l = l * alpha_s[r] + row_sum
        m = m_new
        # O = diag(alpha) O + P V on this thread's columns (the second mma.sync).
        for u in range(COLS):
            d = c + u * BN
            if d < D:
                a = acc[u] * alpha
                for cc in range(BN):
                    a += Ps[r, cc] * Vs[cc, d]
                acc[u] = a
        cuda.syncthreads()
    if valid:
        inv = 1.0 / l if l != 0.0 else 0.0
        for u in range(COLS):
            d = c + u * BN
            if d < D:
                o[b, h, i, d] = acc[u] * inv
        if c == 0:
            lse[b, h, i] = m + math.log(l) if l != 0.0 else -math.inf


@cuda.jit(device=True)
def block_row(H, Sq, Skv, m0, r, bm, causal):
    """Row r of the block of bm packed rows from m0 (rows (i, h), i-major): (valid, i, h, n_end),
    n_end the keys the block visits (under a causal mask: up to its last row's diagonal)."""
    row = m0 + r
    i = min(row, H * Sq - 1) // H
    h = min(row, H * Sq - 1) % H
    i_last = min(Sq - 1, (m0 + bm - 1) // H)
    n_end = min(Skv, max(0, i_last + Skv - Sq + 1)) if causal else Skv
    return row < H * Sq, i, h, n_end


@cuda.jit
def mqa_flash_pipelined_kernel(q, k, v, o, lse, scale, causal):
    # mqa_flash_tiled_kernel's threads and tiles; K, V and P double-buffered (buffer t % 2).
    Qs = cuda.shared.array((BM, DMAX), float32)
    Ks = cuda.shared.array((2, BN, DMAX), float32)
    Vs = cuda.shared.array((2, BN, DMAX), float32)
    Ps = cuda.shared.array((2, BM, BN), float32)
    red = cuda.shared.array((BM, BN), float32)   # the scores of the tile being softmaxed
    acc = cuda.local.array(COLS, float32)
    B, H, Sq, D = q.shape
    Skv = k.shape[1]
    c, r = cuda.threadIdx.x, cuda.threadIdx.y
    b = cuda.blockIdx.y
    valid, i, h, n_end = block_row(H, Sq, Skv, cuda.blockIdx.x * BM, r, BM, causal)
    off = Skv - Sq
    n_tiles = (n_end + BN - 1) // BN
    for d in range(c, D, BN):
        Qs[r, d] = q[b, h, i, d] if valid else 0.0
    for u in range(COLS):
        acc[u] = 0.0
    m = -math.inf
    l = 0.0
    for t in range(n_tiles + 1):     # t = n_tiles: the epilogue, P V of the last tile only
        cur, prev = t % 2, (t + 1) % 2
        n0 = t * BN
        if t < n_tiles:               # the producer: tile t into buffer t % 2
            for d in range(c, D, BN):
                for rr in range(r, BN, BM):
                    inside = n0 + rr < Skv
                    Ks[cur, rr, d] = k[b, n0 + rr, d] if inside else 0.0
                    Vs[cur, rr, d] = v[b, n0 + rr, d] if inside else 0.0
        cuda.syncthreads()
        s = -math.inf
        if t < n_tiles:               # S_t = Q K_t^T ...
            j = n0 + c
            if j < Skv and (not causal or j <= i + off):
                dot = 0.0
                for d in range(D):
                    dot += Qs[r, d] * Ks[cur, c, d]
                s = dot * scale
        if t > 0:                     # ... and O += P_{t-1} V_{t-1}, at tile t-1's max
            for u in range(COLS):
                d = c + u * BN
                if d < D:
                    a = acc[u]
                    for cc in range(BN):
                        a += Ps[prev, r, cc] * Vs[prev, cc, d]
                    acc[u] = a
        if t < n_tiles:               # the softmax of tile t (on the GPU: under the P V above)
            red[r, c] = s
            cuda.syncthreads()
            m_tile = -math.inf
            for cc in range(BN):
                m_tile = max(m_tile, red[r, cc])
            m_new = max(m, m_tile)
            m_use = m_new if m_new > -math.inf else 0.0
            alpha = math.exp(m - m_use)
            Ps[cur, r, c] = math.exp(s - m_use)
            cuda.syncthreads()
            row_sum = 0.0
            for cc in range(BN):
                row_sum += Ps[cur, r, cc]
            l = l * alpha + row_sum
            m = m_new
            for u in range(COLS):     # O to tile t's max, once its P V (tile t-1) is in
                acc[u] *= alpha
        cuda.syncthreads()            # buffers of tile t-1 are free for tile t+1
    if valid:
        inv = 1.0 / l if l != 0.0 else 0.0
        for u in range(COLS):
            d = c + u * BN
            if d < D:
                o[b, h, i, d] = acc[u] * inv
        if c == 0:
            lse[b, h, i] = m + math.log(l) if l != 0.0 else -math.inf


def mqa_flash(q, k, v, causal=False, scale=None, return_lse=False):
    """Fused online-softmax MQA, one thread per packed (i, h) row; float32 torch tensors in and out."""
    return run_packed_rows(mqa_flash_kernel, BM, BM, q, k, v, causal, scale, return_lse, dmax=DMAX)


def mqa_flash_tiled(q, k, v, causal=False, scale=None, return_lse=False):
    """The same algorithm as tile products (the tensor-core kernel's structure), in float32."""
    return run_packed_rows(mqa_flash_tiled_kernel, BM, (BN, BM), q, k, v, causal, scale, return_lse, dmax=DMAX)


def mqa_flash_pipelined(q, k, v, causal=False, scale=None, return_lse=False):
    """The tiled algorithm with FlashAttention-3's loop rotation (08's warp-specialised consumers)."""
    return run_packed_rows(mqa_flash_pipelined_kernel, BM, (BN, BM), q, k, v, causal, scale, return_lse, dmax=DMAX)
