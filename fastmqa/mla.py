"""Multi-head Latent Attention (MLA), as in DeepSeek-V2 (arXiv 2405.04434, section 2.1).

Per token the layer caches one latent c_kv of kv_lora_rank numbers and one RoPE key
k_rope of rope_dim numbers, shared by all heads:

    c_kv   = RMSNorm(W_DKV x)                 (r)        the compressed K/V
    k_rope = RoPE(W_KR x)                     (d_r)      the decoupled position key
    k_h    = [W_UK_h c_kv , k_rope]           (d + d_r)  head h's key, rebuilt from the cache
    v_h    = W_UV_h c_kv                      (d)
    q_h    = [q_nope_h , RoPE(q_rope_h)]      (d + d_r)  from W_Q x, per head
    o      = W_O [softmax(q_h k_h^T / sqrt(d + d_r)) v_h]_h

Naive path: decompress the cache into per-head K and V (what MHA would have cached) and
attend. Absorbed path: q_nope_h . (W_UK_h c) = (W_UK_h^T q_nope_h) . c, so W_UK moves into
the query and W_UV into the output, and attention runs as MQA over the cache itself: one
shared "K/V head" of width r + d_r whose key is [c_kv, k_rope] and whose value is c_kv.
The MQA kernels need k and v of one shape, so the value passed is the whole cache row and
the d_r RoPE columns of the output are dropped (as FlashMLA does with its 576-wide cache).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .layers import check_input, head_dim_of
from .ops import mqa_attention


def rope_angles(positions, dim, base=10000.0, dtype=torch.float32):
    """cos, sin of shape positions.shape + (dim/2,) for rotary embeddings (RoFormer)."""
    inv_freq = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=dtype) / dim)
    ang = positions.to(dtype).unsqueeze(-1) * inv_freq
    return ang.cos(), ang.sin()


def apply_rope(x, positions, base=10000.0):
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x (..., S, d) by position; positions must
    broadcast to x.shape[:-1]. Computed in fp32 (fp64 for fp64), returned in x's dtype."""
    d = x.shape[-1]
    if d == 0:
        return x
    work = torch.promote_types(x.dtype, torch.float32)
    cos, sin = rope_angles(positions, d, base, work)
    x1, x2 = x.to(work).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def latent_rank(head_dim, mla_compression=0.5, kv_lora_rank=None) -> int:
    """kv_lora_rank, or mla_compression x MQA's K+V width (2 * head_dim)."""
    if kv_lora_rank is not None:
        if isinstance(kv_lora_rank, bool) or not isinstance(kv_lora_rank, int) or kv_lora_rank < 1:
            raise ValueError(f"kv_lora_rank must be a positive int or None, got {kv_lora_rank!r}")
        return kv_lora_rank
    if isinstance(mla_compression, bool) or not isinstance(mla_compression, (int, float)) or not mla_compression > 0:
        raise ValueError(f"mla_compression must be a positive number (latent width / MQA's 2*head_dim), "
                         f"got {mla_compression!r}")
    r = round(mla_compression * 2 * head_dim)
    if r < 1:
        raise ValueError(f"mla_compression={mla_compression} gives a latent of {r} numbers for head_dim={head_dim}")
    return r


class MultiHeadLatentAttention(nn.Module):
    """MLA layer. forward(x, kv_cache=None, return_kv=False, absorb=None) -> (B, S, hidden).

    kv_lora_rank: latent width r (default mla_compression * 2 * head_dim);
    rope_dim: width of the decoupled RoPE key and of each head's RoPE query part (even, may be 0);
    absorb: default path (True: attention over the latent, MQA-style; False: decompress).
    """

    def __init__(self, hidden_dim, num_heads, kv_lora_rank=None, rope_dim=64, mla_compression=0.5, causal=False,
                 rope_base=10000.0, absorb=True):
        super().__init__()
        self.head_dim = head_dim_of(hidden_dim, num_heads)
        if isinstance(rope_dim, bool) or not isinstance(rope_dim, int) or rope_dim < 0 or rope_dim % 2:
            raise ValueError(f"rope_dim must be an even int >= 0, got {rope_dim!r}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        self.hidden_dim, self.num_heads, self.causal, self.absorb = hidden_dim, num_heads, causal, bool(absorb)
        self.kv_lora_rank = latent_rank(self.head_dim, mla_compression, kv_lora_rank)
        self.rope_dim, self.rope_base = rope_dim, float(rope_base)
        H, d, r = num_heads, self.head_dim, self.kv_lora_rank
        self.scale = 1.0 / math.sqrt(d + rope_dim)
        self.q_proj = nn.Linear(hidden_dim, H * (d + rope_dim), bias=False)
        self.kv_down = nn.Linear(hidden_dim, r + rope_dim, bias=False)   # W_DKV and W_KR
        self.kv_norm = nn.RMSNorm(r, eps=1e-6)
        self.kv_up = nn.Linear(r, H * 2 * d, bias=False)                  # W_UK and W_UV, per head
        self.out_proj = nn.Linear(H * d, hidden_dim, bias=False)

    @property
    def latent_dim(self) -> int:
        """Numbers cached per token: r + rope_dim."""
        return self.kv_lora_rank + self.rope_dim

    def up_weights(self):
        """W_UK, W_UV as (H, head_dim, r)."""
        w = self.kv_up.weight.view(self.num_heads, 2 * self.head_dim, self.kv_lora_rank)
        return w[:, :self.head_dim], w[:, self.head_dim:]

    def forward(self, x, kv_cache=None, return_kv=False, absorb=None):
        check_input(x, self.hidden_dim)
        B, S, _ = x.shape
        H, d, r, dr = self.num_heads, self.head_dim, self.kv_lora_rank, self.rope_dim
        pos = kv_cache.positions(S) if kv_cache is not None else torch.arange(S, device=x.device)
        q = self.q_proj(x).view(B, S, H, d + dr).transpose(1, 2)          # (B, H, S, d + dr)
        q_nope, q_rope = q.split([d, dr], dim=-1)
        q_rope = apply_rope(q_rope, pos.unsqueeze(-2) if pos.dim() == 2 else pos, self.rope_base)
        c, k_rope = self.kv_down(x).split([r, dr], dim=-1)
        latent = torch.cat([self.kv_norm(c), apply_rope(k_rope, pos, self.rope_base)], dim=-1)  # (B, S, r + dr)
        if kv_cache is not None:
            kv_cache.append(latent)
        absorb = self.absorb if absorb is None else absorb
        o = self._absorbed(q_nope, q_rope, latent, kv_cache) if absorb else self._naive(q_nope, q_rope, latent, kv_cache)
        out = self.out_proj(o.transpose(1, 2).reshape(B, S, H * d))
        return (out, (latent,)) if return_kv else out

    def _absorbed(self, q_nope, q_rope, latent, kv_cache):
        w_uk, w_uv = self.up_weights()
        q_lat = torch.einsum("bhsd,hdr->bhsr", q_nope, w_uk)             # W_UK absorbed into q
        qa = torch.cat([q_lat, q_rope], dim=-1)                           # (B, H, S, r + dr)
        if kv_cache is not None:
            o = kv_cache.attend(qa, causal=self.causal, scale=self.scale)
        else:
            o = mqa_attention(qa, latent, latent, causal=self.causal, scale=self.scale)
        return torch.einsum("bhsr,hdr->bhsd", o[..., :self.kv_lora_rank], w_uv)  # W_UV absorbed into o

    def _naive(self, q_nope, q_rope, latent, kv_cache):
        B, H, S, d = q_nope.shape
        r = self.kv_lora_rank
        lat = kv_cache.k if kv_cache is not None else latent                # (B, Skv, r + dr)
        Skv = lat.shape[1]
        kv = self.kv_up(lat[..., :r]).view(B, Skv, H, 2 * d).transpose(1, 2)  # decompressed, per head
        k_nope, v = kv.split([d, d], dim=-1)
        k = torch.cat([k_nope, lat[..., r:].unsqueeze(1).expand(B, H, Skv, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        s = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if kv_cache is not None:
            mask = kv_cache.mask(S, self.causal)                              # (B, 1, S, Smax)
        elif self.causal:
            i = torch.arange(S, device=q.device).view(-1, 1)
            mask = torch.arange(Skv, device=q.device).view(1, -1) <= i
        else:
            mask = None
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s.to(torch.promote_types(s.dtype, torch.float32)), dim=-1)  # fp32 at least
        return torch.matmul(p.to(v.dtype), v)

    def extra_repr(self):
        return (f"hidden_dim={self.hidden_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"kv_lora_rank={self.kv_lora_rank}, rope_dim={self.rope_dim}, causal={self.causal}")
