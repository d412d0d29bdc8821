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

Edge cases (the contract every kernel and prototype is tested against):

* Empty inputs: B = 0, H = 0 or Sq = 0 give an empty output of shape (B, H, Sq, D).
  Skv = 0 (no keys at all) makes every row fully masked: zeros, lse = -inf. A head dim of 0,
  integer dtypes, a scale that is not a finite positive float, and a non-bool `causal` are
  refused by the public functions with a message naming the argument.
* Ragged caches (`seqlens`): keys j >= seqlens[b] are never read. Whatever they hold, even
  NaN or inf (a KV cache is allocated with torch.empty), the result is the same as with the
  cache cut to seqlens[b]; seqlens[b] = 0 makes the sequence's rows fully masked.
* NaN propagates, it is never turned into silent zeros: a NaN anywhere in q[b, h, i] makes
  row (b, h, i) NaN (every column, and its lse); a NaN in k[b, j] makes NaN every row that
  sees key j; a NaN in v[b, j, d] makes column d NaN in every row that sees key j. A row
  that sees no key is zeros whatever its q holds (nothing is read). Rows that do not see
  key j because of the causal mask must not depend on it through k; through a NaN or inf
  in v they may (here: p = 0 times NaN is NaN in the matmul; tiled kernels that load the
  diagonal tile do the same), so that case is unspecified.
* Infinities: +-inf in v[b, j, d] gives +-inf in column d of the rows that see key j (NaN if
  they see both signs). +-inf in q or k makes scores infinite: a score of -inf drops its
  key; a score of +inf or inf - inf = NaN has no finite softmax and makes the row NaN.
* Large and small magnitudes: softmax subtracts the row max, so inputs scaled by 1e6 or
  1e-6 and scales from 1e-3 to 1e3 stay finite (in fp32/bf16, whose range holds the
  scores); only scores beyond the dtype's range (fp16 past 65504) overflow, as in PyTorch.
"""
from __future__ import annotations

import math

import torch

from .validate import check_causal, check_qkv, check_scale, check_seqlens


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
        # Keys past the length are never read: zero them in v so NaN garbage there cannot
        # leak into the matmul as 0 * NaN (their scores are masked below).
        v = v.masked_fill(~mask.view(B, 1, Skv, 1), 0)
        if causal:
            i = torch.arange(Sq, device=q.device).view(1, 1, 1, Sq, 1)
            mask = mask & (j <= i + (lens - Sq))
    elif causal:
        mask = causal_mask(Sq, Skv, q.device).view(1, 1, 1, Sq, Skv)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    # softmax by hand so fully masked rows give 0 (not NaN) and we keep the lse.
    # Skv = 0: no key at all, every row fully masked (amax of an empty axis would raise).
    m = s.amax(dim=-1, keepdim=True) if Skv else s.new_full((*s.shape[:-1], 1), float("-inf"))
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


def _check_args(causal, scale):
    check_causal(causal)
    check_scale(scale)


def mqa_attention_ref(q, k, v, causal=False, scale=None, return_lse=False, seqlens=None):
    """MQA: q (B, H, Sq, D); k, v (B, 1, Skv, D) or (B, Skv, D). Returns (B, H, Sq, D).

    seqlens: optional (B,) int32/int64 lengths in [0, Skv], on any device."""
    B, _, _, Skv, _, _ = check_qkv(q, k, v, kv_heads=1)
    _check_args(causal, scale)
    if seqlens is not None:
        check_seqlens(seqlens, B, Skv, None, dtypes=(torch.int32, torch.int64), name="seqlens")
    return attention_ref(q, k, v, causal=causal, scale=scale, return_lse=return_lse, seqlens=seqlens)


def gqa_attention_ref(q, k, v, causal=False, scale=None, return_lse=False):
    """GQA: k, v (B, G, Skv, D) with H % G == 0."""
    check_qkv(q, k, v, kv_heads=None)
    _check_args(causal, scale)
    return attention_ref(q, k, v, causal=causal, scale=scale, return_lse=return_lse)


def mha_attention_ref(q, k, v, causal=False, scale=None, return_lse=False):
    """MHA: k, v (B, H, Skv, D)."""
    check_qkv(q, k, v, kv_heads=q.shape[1] if getattr(q, "dim", lambda: 0)() == 4 else None)
    _check_args(causal, scale)
    return attention_ref(q, k, v, causal=causal, scale=scale, return_lse=return_lse)


def reference_fp64(q, k, v, causal=False, scale=None, seqlens=None):
    """The ground truth: the same inputs upcast to float64, on the CPU."""
    return attention_ref(q.detach().double().cpu(), k.detach().double().cpu(),
                         v.detach().double().cpu(), causal=causal, scale=scale,
                         seqlens=None if seqlens is None else seqlens.cpu())
