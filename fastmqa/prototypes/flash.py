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

`online_softmax_stats` is the rescaling rule in numpy, for checking it against the two-pass
softmax.
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
                    m_tile = max(m_tile, s[jj])
            m_new = max(m, m_tile)
            if m_new > -math.inf:              # else the row has seen no key yet
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
        inv = 1.0 / l if l > 0.0 else 0.0      # a row that saw no key: zeros, lse = -inf
        for d in range(D):
            o[b, h, i, d] = acc[d] * inv
        lse[b, h, i] = m + math.log(l) if l > 0.0 else -math.inf


@cuda.jit
def mqa_flash_tiled_kernel(q, k, v, o, lse, scale, causal):
    # Thread (r, c) = (threadIdx.y, threadIdx.x) of a (BM, BN) block: S[r, c] is its score,
    # and it owns O[r, d] for d = c, c + BN, ... (a strided fragment of row r).
    Qs = cuda.shared.array((BM, DMAX), float32)
    Ks = cuda.shared.array((BN, DMAX), float32)
    Vs = cuda.shared.array((BN, DMAX), float32)
    Ps = cuda.shared.array((BM, BN), float32)
    alpha_s = cuda.shared.array(BM, float32)
    acc = cuda.local.array(DMAX // BN, float32)
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
    for u in range(DMAX // BN):
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
        for u in range(DMAX // BN):
            d = c + u * BN
            if d < D:
                a = acc[u] * alpha
                for cc in range(BN):
                    a += Ps[r, cc] * Vs[cc, d]
                acc[u] = a
        cuda.syncthreads()
    if valid:
        inv = 1.0 / l if l > 0.0 else 0.0
        for u in range(DMAX // BN):
            d = c + u * BN
            if d < D:
                o[b, h, i, d] = acc[u] * inv
        if c == 0:
            lse[b, h, i] = m + math.log(l) if l > 0.0 else -math.inf


def mqa_flash(q, k, v, causal=False, scale=None, return_lse=False):
    """Fused online-softmax MQA, one thread per packed (i, h) row; float32 torch tensors in and out."""
    return run_packed_rows(mqa_flash_kernel, BM, BM, q, k, v, causal, scale, return_lse, dmax=DMAX)


def mqa_flash_tiled(q, k, v, causal=False, scale=None, return_lse=False):
    """The same algorithm as tile products (the tensor-core kernel's structure), in float32."""
    return run_packed_rows(mqa_flash_tiled_kernel, BM, (BN, BM), q, k, v, causal, scale, return_lse, dmax=DMAX)
