"""Chapter 04 prototype: warp primitives, a query row belongs to a warp.

The algorithm of kernels/03_warp_shuffle.cu: a block of NW warps owns NW * R query rows of one
batch b, packed i-major (row = i * H + h), and loads each K/V tile into shared memory once
for all of them. Each warp owns R rows; its 32 lanes split the head dim, so lane l holds
q[d] and the output o[d] for d = l, l + 32, ... (the .cu kernel gives each lane D/32
*contiguous* floats instead, to load them as one float4; this strided split works for any D).

A dot product is then 32 partial sums, one per lane, added across the warp with shuffles:
`reduce_scatter` reduces C keys' partials at once (at each xor step a lane keeps half its
values and trades the other half with its partner), after which lane l holds the score of key
l // (32 // C). The row max and sum are butterfly shuffles, and p_j reaches every lane for the
P.V product with a `shfl_sync` broadcast. The softmax is still two-pass (max, then exp/sum/PV).

In numba's simulator shuffles come from `fastmqa.prototypes._warpsim` (the simulator has none
of its own); they are slow there, so keep sizes tiny.
"""
from __future__ import annotations

import math

import numpy as np
from numba import float32

from .. import sim
from . import _warpsim
from ._common import run_packed_rows

_warpsim.install()
# numba's simulator swaps the module-global `cuda` while it runs a kernel, so the
# switch (fastmqa.sim) is thrown before this import and `cuda` must be a global here.
cuda = sim.cuda()

NW = 1       # warps per block; the .cu kernel uses 8
R = 2        # query rows per warp; the .cu kernel uses 4
C = 16       # keys per reduce-scatter chunk (a power of two <= 32), as in the .cu kernel
TJ = 16      # keys per K/V tile (a multiple of C); the .cu kernel uses 32
DMAX = 128   # largest head dim
F = DMAX // 32   # head-dim slots per lane
FULL = 0xFFFFFFFF


def reduce_scatter_numpy(parts, plain=False):
    """The warp's reduce-scatter in numpy, for looking at: parts[lane, c] is lane's partial sum
    for key c (32 lanes, C keys). Returns (held, shuffles): held[lane] = the full sum each lane
    ends with (key lane // (32 // C)), and the number of shuffle instructions a warp executed.
    plain=True does one 5-step butterfly per key instead (every lane ends with every sum)."""
    x = np.array(parts, dtype=np.float64)
    lanes, nc = x.shape
    assert lanes == 32 and nc & (nc - 1) == 0 and nc <= 32
    if plain:
        for off in (16, 8, 4, 2, 1):
            x = x + x[np.arange(32) ^ off]
        return x, 5 * nc
    shuffles, n, off = 0, nc // 2, 16
    while n >= 1:
        upper = (np.arange(32) & off) != 0
        keep = np.where(upper[:, None], x[:, n:2 * n], x[:, :n])
        send = np.where(upper[:, None], x[:, :n], x[:, n:2 * n])
        x = keep + send[np.arange(32) ^ off]     # lane l receives what lane l ^ off sent
        shuffles += n
        n, off = n // 2, off // 2
    s = x[:, 0]
    while off >= 1:
        s = s + s[np.arange(32) ^ off]
        shuffles += 1
        off //= 2
    return s, shuffles


@cuda.jit(device=True)
def reduce_scatter(x, s, lane):
    # x[r, c]: this lane's partial dot product of row r with key c (c < C).
    # Out: s[r] = the full dot product of row r with key lane // (32 // C).
    n, off = C // 2, 16
    while n >= 1:
        upper = (lane & off) != 0          # this lane keeps the upper half of the keys
        for c in range(n):
            for r in range(R):
                lo, hi = x[r, c], x[r, c + n]
                keep = hi if upper else lo
                send = lo if upper else hi
                x[r, c] = keep + cuda.shfl_xor_sync(FULL, send, off)
        n //= 2
        off //= 2
    for r in range(R):
        s[r] = x[r, 0]
        off = 16 // C                      # lanes that differ in the low bits: plain butterfly
        while off >= 1:
            s[r] += cuda.shfl_xor_sync(FULL, s[r], off)
            off //= 2


@cuda.jit(device=True)
def partial_scores(part, qf, Ks, c0, lane, D):
    for c in range(C):
        for r in range(R):
            acc = 0.0
            for f in range(F):
                d = f * 32 + lane
                if d < D:
                    acc += qf[r, f] * Ks[c0 + c, d]
            part[r, c] = acc


@cuda.jit
def mqa_warp_shuffle_kernel(q, k, v, o, lse, scale, causal):
    # q, o: (B, H, Sq, D); k, v: (B, Skv, D); lse: (B, H, Sq)
    Ks = cuda.shared.array((TJ, DMAX), float32)
    Vs = cuda.shared.array((TJ, DMAX), float32)
    qf = cuda.local.array((R, F), float32)
    acc = cuda.local.array((R, F), float32)
    part = cuda.local.array((R, C), float32)
    s = cuda.local.array(R, float32)
    m = cuda.local.array(R, float32)
    l = cuda.local.array(R, float32)
    p = cuda.local.array(R, float32)
    j_end = cuda.local.array(R, np.int32)
    B, H, Sq, D = q.shape
    Skv = k.shape[1]
    lane = cuda.threadIdx.x % 32
    warp = cuda.threadIdx.x // 32
    b = cuda.blockIdx.y
    rows = H * Sq
    r0 = (cuda.blockIdx.x * NW + warp) * R    # this warp's first packed row
    off = Skv - Sq                            # bottom-right aligned causal: j <= i + off
    for r in range(R):
        row = min(r0 + r, rows - 1)
        i, h = row // H, row % H
        j_end[r] = 0
        if r0 + r < rows:
            j_end[r] = min(Skv, max(0, i + off + 1)) if causal else Skv
        for f in range(F):
            d = f * 32 + lane
            qf[r, f] = q[b, h, i, d] if (d < D and r0 + r < rows) else 0.0
            acc[r, f] = 0.0
        m[r] = -math.inf
        l[r] = 0.0
    # The block's key range (its last row sees the most): the same for every lane, so all
    # lanes run the same loop trips and meet at every shuffle.
    i_last = (min(rows, (cuda.blockIdx.x + 1) * NW * R) - 1) // H
    jmax = min(Skv, max(0, i_last + off + 1)) if causal else Skv
    spread = 32 // C                          # lanes holding the same key after the reduce

    # Pass 1: row maxima.
    for j0 in range(0, jmax, TJ):
        cuda.syncthreads()
        for e in range(cuda.threadIdx.x, TJ * D, NW * 32):
            jj, d = e // D, e % D
            Ks[jj, d] = k[b, j0 + jj, d] if j0 + jj < Skv else 0.0
        cuda.syncthreads()
        for c0 in range(0, min(TJ, jmax - j0), C):
            partial_scores(part, qf, Ks, c0, lane, D)
            reduce_scatter(part, s, lane)
            j = j0 + c0 + lane // spread
            for r in range(R):
                if j < j_end[r]:
                    m[r] = max(m[r], s[r] * scale)
    for r in range(R):
        x = m[r]
        sh = 16
        while sh >= 1:
            x = max(x, cuda.shfl_xor_sync(FULL, x, sh))
            sh //= 2
        m[r] = x

    # Pass 2: p = exp(s - m) on the lane holding the key, broadcast to all lanes for P.V.
    for j0 in range(0, jmax, TJ):
        cuda.syncthreads()
        for e in range(cuda.threadIdx.x, TJ * D, NW * 32):
            jj, d = e // D, e % D
            inside = j0 + jj < Skv
            Ks[jj, d] = k[b, j0 + jj, d] if inside else 0.0
            Vs[jj, d] = v[b, j0 + jj, d] if inside else 0.0
        cuda.syncthreads()
        for c0 in range(0, min(TJ, jmax - j0), C):
            partial_scores(part, qf, Ks, c0, lane, D)
            reduce_scatter(part, s, lane)
            j = j0 + c0 + lane // spread
            for r in range(R):
                p[r] = math.exp(s[r] * scale - m[r]) if j < j_end[r] else 0.0
                l[r] += p[r]                  # each key is counted by `spread` lanes
            for c in range(C):
                for r in range(R):
                    pc = cuda.shfl_sync(FULL, p[r], c * spread)
                    for f in range(F):
                        d = f * 32 + lane
                        if d < D:
                            acc[r, f] += pc * Vs[c0 + c, d]

    for r in range(R):
        x = l[r]
        sh = 16
        while sh >= 1:
            x += cuda.shfl_xor_sync(FULL, x, sh)
            sh //= 2
        lr = x / spread
        if r0 + r < rows:
            row = r0 + r
            i, h = row // H, row % H
            inv = 1.0 / lr if lr != 0.0 else 0.0   # a row that sees no key: zeros, lse = -inf
            for f in range(F):
                d = f * 32 + lane
                if d < D:
                    o[b, h, i, d] = acc[r, f] * inv
            if lane == 0:
                lse[b, h, i] = m[r] + math.log(lr) if lr != 0.0 else -math.inf


def mqa_warp_shuffle(q, k, v, causal=False, scale=None, return_lse=False):
    """Run the prototype; q (B, H, Sq, D) float32 with D <= 128, k, v (B, 1, Skv, D) or (B, Skv, D)."""
    return run_packed_rows(mqa_warp_shuffle_kernel, NW * R, NW * 32, q, k, v, causal, scale, return_lse, DMAX)
