"""Chapter 05 prototype: two matrix products and a softmax kernel, heads folded into M.

The algorithm of kernels/04_cublas.cu in three steps:

1. S_b = scale * Q_b K_b^T for every batch b, with q (B, H, Sq, D) viewed as (B, H*Sq, D):
   in MQA all heads multiply the same K, so this is one (H*Sq, D) x (D, Skv) product per b.
2. P = softmax(S) row by row, in place, with the causal mask: a numba.cuda kernel with one
   warp per score row (row = (b, h, i) flattened, i = row % Sq), a running (max, sum) pair
   per lane merged with shuffles, then p = exp(s - m) / l written back (zeros where masked).
3. O_b = P_b V_b, again one (H*Sq, Skv) x (Skv, D) product per b.

Steps 1 and 3 are cuBLAS's strided-batched SGEMM in the .cu kernel; numba has no cuBLAS
binding, so this prototype does them with torch.matmul in float32 on the CPU (the same
arithmetic, a different library). Only the softmax is a numba kernel here.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import sim
from . import _warpsim
from ._common import finish, prepare, to_device

_warpsim.install()
# numba's simulator swaps the module-global `cuda` while it runs a kernel, so the
# switch (fastmqa.sim) is thrown before this import and `cuda` must be a global here.
cuda = sim.cuda()

WARPS = 4    # score rows per block; the .cu kernel uses 8
FULL = 0xFFFFFFFF


@cuda.jit
def softmax_rows_kernel(S, lse, Sq, causal):
    # S: (rows, Skv) scores in, probabilities out; lse: (rows,)
    rows, Skv = S.shape
    lane = cuda.threadIdx.x % 32
    row = cuda.blockIdx.x * WARPS + cuda.threadIdx.x // 32
    if row >= rows:
        return                                # the whole warp leaves together
    i = row % Sq
    j_end = min(Skv, max(0, i + Skv - Sq + 1)) if causal else Skv   # bottom-right aligned
    m = -math.inf
    l = 0.0
    for j in range(lane, j_end, 32):          # consecutive lanes, consecutive keys: coalesced
        s = S[row, j]
        if s > m:
            l = l * math.exp(m - s) + 1.0     # rescale the sum to the new max
            m = s
        else:
            l += math.exp(s - m)
    off = 16
    while off >= 1:                           # merge the 32 lanes' (max, sum) pairs
        mo = cuda.shfl_xor_sync(FULL, m, off)
        lo = cuda.shfl_xor_sync(FULL, l, off)
        mn = max(m, mo)
        l = (l * math.exp(m - mn) if l != 0.0 else 0.0) + (lo * math.exp(mo - mn) if lo != 0.0 else 0.0)
        m = mn
        off //= 2
    inv = 1.0 / l if l != 0.0 else 0.0         # a row that sees no key: P = 0, so O = 0
    for j in range(lane, Skv, 32):
        S[row, j] = math.exp(S[row, j] - m) * inv if j < j_end else 0.0
    if lane == 0:
        lse[row] = m + math.log(l) if l != 0.0 else -math.inf


def softmax_rows(S, Sq, causal):
    """Step 2 on a (rows, Skv) float32 numpy array: returns (P, lse) as numpy arrays."""
    rows = S.shape[0]
    dS, dl = to_device(np.ascontiguousarray(S, dtype=np.float32), np.full(rows, -np.inf, dtype=np.float32))
    if rows and S.shape[1]:
        softmax_rows_kernel[(rows + WARPS - 1) // WARPS, WARPS * 32](dS, dl, Sq, bool(causal))
    return dS.copy_to_host(), dl.copy_to_host()


def mqa_cublas(q, k, v, causal=False, scale=None, return_lse=False):
    """Run the prototype; q (B, H, Sq, D) float32, k, v (B, 1, Skv, D) or (B, Skv, D)."""
    qn, kn, vn, scale, (B, H, Sq, Skv, D) = prepare(q, k, v, scale)
    Q = torch.from_numpy(qn).reshape(B, H * Sq, D)            # heads folded into M
    K, V = torch.from_numpy(kn), torch.from_numpy(vn)          # (B, Skv, D)
    S = torch.matmul(Q, K.transpose(1, 2)) * np.float32(scale)  # step 1: (B, H*Sq, Skv)
    P, lse = softmax_rows(S.reshape(B * H * Sq, Skv).numpy(), Sq, causal)   # step 2
    O = torch.matmul(torch.from_numpy(P).reshape(B, H * Sq, Skv), V)        # step 3
    out = O.reshape(B, H, Sq, D).to(q.device)
    lse_t = torch.from_numpy(lse).reshape(B, H, Sq).to(q.device)
    return (out, lse_t) if return_lse else out
