"""Reference attention in plain torch: MHA, GQA and MQA, any dtype.

float64 is the ground truth every kernel is checked against (`fastmqa.check`).
Layouts follow torch's SDPA / GQA convention:

    q     (B, H, Sq, D)
    k, v  (B, G, Skv, D)     G = H (MHA), 1 < G < H with H % G == 0 (GQA), G = 1 (MQA)
          (B, Skv, D)        also accepted for MQA: the single shared K/V head
    out   (B, H, Sq, D)

`causal` masks bottom-right aligned, as in decoding: query i (of Sq) sees key j (of Skv)
iff j <= i + (Skv - Sq). A query row that sees no key at all (only possible when Sq > Skv)
returns zeros, and its log-sum-exp is -inf; this is the documented fully-masked behaviour
shared by every kernel in the course.
"""
from __future__ import annotations

import math

import torch

from .validate import check_qkv


def causal_mask(Sq: int, Skv: int, device=None) -> torch.Tensor:
    """Boolean (Sq, Skv) mask, True where query i may attend to key j (bottom-right aligned)."""
    i = torch.arange(Sq, device=device).unsqueeze(1)
    j = torch.arange(Skv, device=device).unsqueeze(0)
    return j <= i + (Skv - Sq)


def attention_ref(q, k, v, causal=False, scale=None, return_lse=False, seqlens=None):
    """Attention for any number of K/V heads G dividing H. Computes in q's dtype.

    seqlens: optional (B,) int tensor; keys j >= seqlens[b] are masked (a ragged KV cache).
    For causal attention with seqlens, the alignment uses each sequence's own length.
    """
    B, H, Sq, D = q.shape
    if k.dim() == 3:
        k, v = k.unsqueeze(1), v.unsqueeze(1)
    G, Skv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    # (B, G, H/G, Sq, D): the H/G query heads of a group share that group's K/V head.
    qg = q.reshape(B, G, H // G, Sq, D)
    s = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * scale  # (B, G, H/G, Sq, Skv)
    mask = None
    if seqlens is not None:
        lens = seqlens.to(device=q.device, dtype=torch.long).view(B, 1, 1, 1, 1)
        j = torch.arange(Skv, device=q.device).view(1, 1, 1, 1, Skv)
        mask = j < lens
        if causal:
            i = torch.arange(Sq, device=q.device).view(1, 1, 1, Sq, 1)
            mask = mask & (j <= i + (lens - Sq))
    elif causal:
        mask = causal_mask(Sq, Skv, q.device).view(1, 1, 1, Sq, Skv)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    # softmax by hand so fully masked rows give 0 (not NaN) and we keep the lse.
    m = s.amax(dim=-1, keepdim=True)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m_safe)
    l = p.sum(dim=-1, keepdim=True)
    l_safe = torch.where(l > 0, l, torch.ones_like(l))
    out = torch.matmul((p / l_safe).to(v.dtype), v.unsqueeze(2))
    out = out.reshape(B, H, Sq, D)
    if return_lse:
        lse = (m_safe + torch.log(l)).reshape(B, H, Sq)  # log(0) = -inf on fully masked rows
        return out, lse.float() if lse.dtype != torch.float64 else lse
    return out


def mqa_attention_ref(q, k, v, causal=False, scale=None, return_lse=False, seqlens=None):
    """MQA: q (B, H, Sq, D); k, v (B, 1, Skv, D) or (B, Skv, D). Returns (B, H, Sq, D)."""
    check_qkv(q, k, v, kv_heads=1)
    return attention_ref(q, k, v, causal=causal, scale=scale, return_lse=return_lse, seqlens=seqlens)


def gqa_attention_ref(q, k, v, causal=False, scale=None, return_lse=False):
    """GQA: k, v (B, G, Skv, D) with H % G == 0."""
    check_qkv(q, k, v, kv_heads=None)
    return attention_ref(q, k, v, causal=causal, scale=scale, return_lse=return_lse)


def mha_attention_ref(q, k, v, causal=False, scale=None, return_lse=False):
    """MHA: k, v (B, H, Skv, D)."""
    check_qkv(q, k, v, kv_heads=q.shape[1] if q.dim() == 4 else None)
    return attention_ref(q, k, v, causal=causal, scale=scale, return_lse=return_lse)


def reference_fp64(q, k, v, causal=False, scale=None, seqlens=None):
    """The ground truth: the same inputs upcast to float64, on the CPU."""
    return attention_ref(q.detach().double().cpu(), k.detach().double().cpu(),
                         v.detach().double().cpu(), causal=causal, scale=scale,
                         seqlens=None if seqlens is None else seqlens.cpu())
