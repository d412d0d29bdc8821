"""Chapter 02 prototype: the naive MQA kernel, one thread per query row (b, h, i).

The same algorithm as kernels/01_naive.cu: two passes over the shared K/V head per row,
everything read from global memory.
"""
from __future__ import annotations

import math

import numpy as np

from .. import sim
from ._common import finish, prepare, to_device

# numba's simulator swaps the module-global `cuda` while it runs a kernel, so the
# switch (fastmqa.sim) is thrown before this import and `cuda` must be a global here.
cuda = sim.cuda()


@cuda.jit
def mqa_naive_kernel(q, k, v, o, scale, causal):
    # q, o: (B, H, Sq, D); k, v: (B, Skv, D)
    row = cuda.grid(1)
    B, H, Sq, D = q.shape
    Skv = k.shape[1]
    if row >= B * H * Sq:
        return
    i = row % Sq
    h = (row // Sq) % H
    b = row // (H * Sq)
    j_end = Skv
    if causal:
        j_end = min(Skv, max(0, i + (Skv - Sq) + 1))
    m = -math.inf
    for j in range(j_end):
        s = 0.0
        for d in range(D):
            s += q[b, h, i, d] * k[b, j, d]
        m = max(m, s * scale)
    l = 0.0
    for d in range(D):
        o[b, h, i, d] = 0.0
    for j in range(j_end):
        s = 0.0
        for d in range(D):
            s += q[b, h, i, d] * k[b, j, d]
        p = math.exp(s * scale - m)
        l += p
        for d in range(D):
            o[b, h, i, d] += p * v[b, j, d]
    if l != 0.0:
        for d in range(D):
            o[b, h, i, d] /= l



def mqa_naive(q, k, v, causal=False, scale=None, threads=64):
    """Run the prototype; q (B, H, Sq, D) float32, k, v (B, 1, Skv, D) or (B, Skv, D)."""
    qn, kn, vn, scale, (B, H, Sq, Skv, D) = prepare(q, k, v, scale)
    dq, dk, dv = to_device(qn, kn, vn)
    do = sim.cuda().to_device(np.zeros_like(qn))
    rows = B * H * Sq
    if rows:
        mqa_naive_kernel[(rows + threads - 1) // threads, threads](dq, dk, dv, do, np.float32(scale), bool(causal))
    return finish(do, q)
