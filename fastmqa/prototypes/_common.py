"""Plumbing shared by the prototypes: torch <-> numba arrays, shapes, launch."""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import sim, validate


def prepare(q, k, v, scale):
    """Validate and return float32 numpy/device arrays q (B,H,Sq,D), k, v (B,Skv,D), scale."""
    B, H, Sq, Skv, D, _ = validate.check_qkv(q, k, v, kv_heads=1)
    validate.check_scale(scale)
    validate.check_tensor("q", q, dtypes=(torch.float32,))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qn = q.detach().cpu().contiguous().numpy()
    kn = k.detach().cpu().reshape(B, Skv, D).contiguous().numpy()
    vn = v.detach().cpu().reshape(B, Skv, D).contiguous().numpy()
    return qn, kn, vn, scale, (B, H, Sq, Skv, D)


def to_device(*arrays):
    cuda = sim.cuda()
    return [cuda.to_device(np.ascontiguousarray(a)) for a in arrays]


def finish(o_dev, like):
    """Copy the result back to a torch tensor on `like`'s device."""
    return torch.from_numpy(o_dev.copy_to_host()).to(like.device)


def run_packed_rows(kernel, rows_per_block, threads, q, k, v, causal, scale, return_lse, dmax=128):
    """Launch a prefill prototype whose blocks each own `rows_per_block` packed (i, h) rows of
    one batch: grid (ceil(H*Sq / rows_per_block), B), arguments (q, k, v, o, lse, scale, causal).
    Returns o, or (o, lse) with return_lse; rows that see no key keep lse = -inf."""
    qn, kn, vn, scale, (B, H, Sq, Skv, D) = prepare(q, k, v, scale)
    if D > dmax:
        raise ValueError(f"head dim D must be <= {dmax} for this prototype, got {D}")
    dq, dk, dv, do, dl = to_device(qn, kn, vn, np.zeros_like(qn), np.full((B, H, Sq), -np.inf, dtype=np.float32))
    if B and H * Sq and Skv:
        grid = ((H * Sq + rows_per_block - 1) // rows_per_block, B)
        kernel[grid, threads](dq, dk, dv, do, dl, np.float32(scale), bool(causal))
    out = finish(do, q)
    return (out, finish(dl, q)) if return_lse else out
