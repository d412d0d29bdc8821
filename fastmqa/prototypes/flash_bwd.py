"""Chapter 09 prototype: the backward of the fused kernel, with the structure of kernels/07_flash_bwd.cu.

Three numba.cuda kernels in fp32, simulator-friendly at tiny sizes:

* `bwd_prep_kernel`: one thread per row (b, h, i): delta_i = sum_d dO_id O_id - dlse_i, and the
  row's lse, with +inf for a row that saw no key (lse = -inf) so that its P is exactly 0.
* `bwd_dkdv_kernel`: one block per (key tile of BN keys, head group, batch). Thread (r, c) of a
  (BN, BM) block owns key j0 + r. K and V stay in shared memory while the block sweeps every head of
  its group and every BM-row query block that sees the tile; per query block thread (r, c) computes
  S^T[r, c] = K_r . Q_c, P^T = exp(S^T * scale - lse_c) and dP^T[r, c] = V_r . dO_c, keeps P^T and
  dS^T = P^T (dP^T - delta_c) in shared memory, then accumulates dV[r, d] += sum_c P^T[r, c] dO[c, d]
  and dK[r, d] += sum_c dS^T[r, c] Q[c, d] for its columns d = c, c + BM, ... in registers (the
  tensor-core kernel does these four products with mma.sync). Each head group writes its own
  partial dK, dV; the runner sums the groups in order (the kernel's reduce).
* `bwd_dq_kernel`: one block per (BM query rows of one head, batch), thread (r, c) of (BM, BN):
  the forward's K/V sweep, computing S, P, dP and dS, then dQ[r, d] += sum_c dS[r, c] K[c, d].

numba has no tensor-core intrinsics, so, as for the forward (`prototypes/flash.py`), this fp32
version is the prototype of the tensor-core kernel; the exponent is clamped at 0 (P <= 1) as there.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import float32

from .. import sim, validate
from ._common import finish, prepare, to_device

cuda = sim.cuda()  # a module global: fastmqa.sim swaps it for the simulator's

BM = 16      # query rows per tile
BN = 16      # keys per tile
DMAX = 128   # largest head dim (shared and local arrays need a constant size)
COLS = DMAX // BM   # columns of dK, dV (or dQ) a thread owns: a literal size for cuda.local.array


@cuda.jit
def bwd_prep_kernel(dout, o, lse, dlse, use_dlse, lse_p, delta):
    B, H, Sq, D = o.shape
    t = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if t >= B * H * Sq:
        return
    b, h, i = t // (H * Sq), (t // Sq) % H, t % Sq
    acc = 0.0
    for d in range(D):
        acc += dout[b, h, i, d] * o[b, h, i, d]
    if use_dlse:
        acc -= dlse[b, h, i]
    delta[b, h, i] = acc
    lse_p[b, h, i] = math.inf if lse[b, h, i] == -math.inf else lse[b, h, i]


@cuda.jit
def bwd_dkdv_kernel(q, k, v, dout, lse_p, delta, part_k, part_v, scale, causal, heads_per_group):
    Ks = cuda.shared.array((BN, DMAX), float32)
    Vs = cuda.shared.array((BN, DMAX), float32)
    Qs = cuda.shared.array((BM, DMAX), float32)
    Os = cuda.shared.array((BM, DMAX), float32)   # the dO tile
    Ps = cuda.shared.array((BN, BM), float32)     # P^T
    Ss = cuda.shared.array((BN, BM), float32)     # dS^T
    Ls = cuda.shared.array(BM, float32)
    Ds = cuda.shared.array(BM, float32)
    dk_acc = cuda.local.array(COLS, float32)
    dv_acc = cuda.local.array(COLS, float32)
    B, H, Sq, D = q.shape
    Skv = k.shape[1]
    c, r = cuda.threadIdx.x, cuda.threadIdx.y
    j0, g, b = cuda.blockIdx.x * BN, cuda.blockIdx.y, cuda.blockIdx.z
    j = j0 + r
    off = Skv - Sq
    for d in range(c, D, BM):                    # thread (r, c) loads columns c, c + BM, ... of key row r
        Ks[r, d] = k[b, j, d] if j < Skv else 0.0
        Vs[r, d] = v[b, j, d] if j < Skv else 0.0
    for u in range(COLS):
        dk_acc[u] = 0.0
        dv_acc[u] = 0.0
    i_first = max(0, j0 - off) // BM * BM if causal else 0   # query blocks that see a key of the tile
    for h in range(g * heads_per_group, min(H, (g + 1) * heads_per_group)):
        for i0 in range(i_first, Sq, BM):
            i = i0 + c                           # thread (r, c) loads columns r, r + BN, ... of query row c
            for d in range(r, D, BN):
                Qs[c, d] = q[b, h, i, d] if i < Sq else 0.0
                Os[c, d] = dout[b, h, i, d] if i < Sq else 0.0
            if r == 0:
                Ls[c] = lse_p[b, h, i] if i < Sq else math.inf
                Ds[c] = delta[b, h, i] if i < Sq else 0.0
            cuda.syncthreads()
            # S^T[r, c] and dP^T[r, c]: the two products the kernel does with mma.sync.
            s = 0.0
            dp = 0.0
            for d in range(D):
                s += Ks[r, d] * Qs[c, d]
                dp += Vs[r, d] * Os[c, d]
            p = 0.0
            if j < Skv and not (causal and j > i + off):
                p = math.exp(min(s * scale - Ls[c], 0.0))
            Ps[r, c] = p
            Ss[r, c] = p * (dp - Ds[c])
            cuda.syncthreads()
            # dV += P^T dO, dK += dS^T Q on this thread's columns.
            for u in range(COLS):
                d = c + u * BM
                if d < D:
                    av = dv_acc[u]
                    ak = dk_acc[u]
                    for cc in range(BM):
                        av += Ps[r, cc] * Os[cc, d]
                        ak += Ss[r, cc] * Qs[cc, d]
                    dv_acc[u] = av
                    dk_acc[u] = ak
            cuda.syncthreads()                   # the tiles are reused by the next block
    if j < Skv:
        for u in range(COLS):
            d = c + u * BM
            if d < D:
                part_k[g, b, j, d] = dk_acc[u] * scale
                part_v[g, b, j, d] = dv_acc[u]


@cuda.jit
def bwd_dq_kernel(q, k, v, dout, lse_p, delta, dq, scale, causal):
    Qs = cuda.shared.array((BM, DMAX), float32)
    Os = cuda.shared.array((BM, DMAX), float32)
    Ks = cuda.shared.array((BN, DMAX), float32)
    Vs = cuda.shared.array((BN, DMAX), float32)
    Ss = cuda.shared.array((BM, BN), float32)     # dS
    acc = cuda.local.array(COLS, float32)
    B, H, Sq, D = q.shape
    Skv = k.shape[1]
    c, r = cuda.threadIdx.x, cuda.threadIdx.y
    i0, h, b = cuda.blockIdx.x * BM, cuda.blockIdx.y, cuda.blockIdx.z
    i = i0 + r
    off = Skv - Sq
    for d in range(c, D, BN):
        Qs[r, d] = q[b, h, i, d] if i < Sq else 0.0
        Os[r, d] = dout[b, h, i, d] if i < Sq else 0.0
    L = lse_p[b, h, i] if i < Sq else math.inf
    Dl = delta[b, h, i] if i < Sq else 0.0
    for u in range(COLS):
        acc[u] = 0.0
    i_last = min(Sq - 1, i0 + BM - 1)
    n_end = min(Skv, max(0, i_last + off + 1)) if causal else Skv
    for n0 in range(0, n_end, BN):
        jr = n0 + r                              # thread (r, c) loads columns c, c + BN, ... of key row r
        for d in range(c, D, BN):
            Ks[r, d] = k[b, jr, d] if jr < Skv else 0.0
            Vs[r, d] = v[b, jr, d] if jr < Skv else 0.0
        cuda.syncthreads()
        j = n0 + c
        s = 0.0
        dp = 0.0
        for d in range(D):
            s += Qs[r, d] * Ks[c, d]
            dp += Os[r, d] * Vs[c, d]
        p = 0.0
        if j < Skv and not (causal and j > i + off):
            p = math.exp(min(s * scale - L, 0.0))
        Ss[r, c] = p * (dp - Dl)
        cuda.syncthreads()
        for u in range(COLS):                    # dQ += dS K on this thread's columns
            d = c + u * BN
            if d < D:
                a = acc[u]
                for cc in range(BN):
                    a += Ss[r, cc] * Ks[cc, d]
                acc[u] = a
        cuda.syncthreads()
    if i < Sq:
        for u in range(COLS):
            d = c + u * BN
            if d < D:
                dq[b, h, i, d] = acc[u] * scale


def mqa_flash_bwd(dout, q, k, v, out, lse, dlse=None, causal=False, scale=None, groups=1):
    """Gradients (dq, dk, dv) of MQA attention, float32 torch tensors in and out.

    q, out, dout (B, H, Sq, D); k, v (B, 1, Skv, D) or (B, Skv, D); lse (B, H, Sq), the forward's
    natural-log log-sum-exp; dlse: the gradient reaching lse, or None. groups: head groups of the
    dK/dV kernel (kernels/flash_bwd.cuh: head_groups chooses them from the grid size; any count gives the
    same gradients up to rounding). dk, dv come back as (B, Skv, D)."""
    qn, kn, vn, scale, (B, H, Sq, Skv, D) = prepare(q, k, v, scale)
    if D > DMAX:
        raise ValueError(f"head dim D must be <= {DMAX} for this prototype, got {D}")
    for name, t, shape in (("dout", dout, (B, H, Sq, D)), ("out", out, (B, H, Sq, D)), ("lse", lse, (B, H, Sq))):
        validate.check_tensor(name, t, dtypes=(torch.float32,))
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if dlse is not None and tuple(dlse.shape) != (B, H, Sq):
        raise ValueError(f"dlse must have shape {(B, H, Sq)}, got {tuple(dlse.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    hg = -(-max(H, 1) // min(groups, max(H, 1)))
    G = -(-max(H, 1) // hg)
    host = lambda t: t.detach().cpu().float().contiguous().numpy()
    dl = host(dlse) if dlse is not None else np.zeros((B, H, Sq), np.float32)
    d_q, d_k, d_v, d_do, d_o, d_lse, d_dl = to_device(qn, kn, vn, host(dout), host(out), host(lse), dl)
    d_lp, d_delta, d_dq = to_device(np.zeros((B, H, Sq), np.float32), np.zeros((B, H, Sq), np.float32),
                                    np.zeros_like(qn))
    d_pk, d_pv = to_device(np.zeros((G, B, Skv, D), np.float32), np.zeros((G, B, Skv, D), np.float32))
    if B and H * Sq and Skv:
        rows = B * H * Sq
        bwd_prep_kernel[(rows + 127) // 128, 128](d_do, d_o, d_lse, d_dl, dlse is not None, d_lp, d_delta)
        bwd_dkdv_kernel[(-(-Skv // BN), G, B), (BM, BN)](d_q, d_k, d_v, d_do, d_lp, d_delta, d_pk, d_pv,
                                                         np.float32(scale), bool(causal), hg)
        bwd_dq_kernel[(-(-Sq // BM), H, B), (BN, BM)](d_q, d_k, d_v, d_do, d_lp, d_delta, d_dq,
                                                      np.float32(scale), bool(causal))
    dk = finish(d_pk, q).sum(0) if G > 1 else finish(d_pk, q)[0]   # the groups, summed in order
    dv = finish(d_pv, q).sum(0) if G > 1 else finish(d_pv, q)[0]
    return finish(d_dq, q), dk, dv
