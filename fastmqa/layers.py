"""The attention layers people use: `FastMQALayer` and `ProductionFastMQA`.

    layer = FastMQALayer(hidden_dim=4096, num_heads=32)          # q: 32 heads, k/v: one head
    y = layer(x)                                                  # x (B, S, hidden)
    layer = FastMQALayer.from_mha(mha)                            # uptrain an nn.MultiheadAttention
    model = ProductionFastMQA(1024, 16)
    y, stats = model(x, return_cache_stats=True)                  # stats from the real K/V tensors

`GQALayer` is the same layer with G K/V heads computed by PyTorch's SDPA: the MHA (G = H),
GQA and MQA (G = 1) baselines of the benchmarks and of the decoder in `fastmqa.generate`.

Every layer takes `kv_cache=`, one layer's slot of a `fastmqa.generate.KVCache`: the new
keys and values are written into the preallocated cache and attention runs over it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import memory
from .ops import mqa_attention
from .reference import attention_ref


def head_dim_of(hidden_dim, num_heads) -> int:
    """hidden_dim / num_heads, with errors that name the arguments."""
    for name, val in (("hidden_dim", hidden_dim), ("num_heads", num_heads)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if hidden_dim % num_heads:
        raise ValueError(f"hidden_dim must be divisible by num_heads, got hidden_dim={hidden_dim}, "
                         f"num_heads={num_heads}")
    return hidden_dim // num_heads


def check_input(x, hidden_dim):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != hidden_dim:
        raise ValueError(f"x must be (B, S, {hidden_dim}) (batch, sequence, hidden_dim), "
                         f"got {tuple(x.shape)}")


def pool_kv_heads(w, num_heads, groups, how="mean"):
    """Pool a K or V projection (H*D, ...) of H heads into `groups` heads (G*D, ...).

    "mean" averages the heads of each group (the GQA uptraining recipe of Ainslie et al.,
    2023); "first" keeps the first head of each group.
    """
    if how not in ("mean", "first"):
        raise ValueError(f"kv_init must be 'mean' or 'first', got {how!r}")
    if w.shape[0] % num_heads:
        raise ValueError(f"a K/V projection of {w.shape[0]} rows cannot hold {num_heads} heads")
    D = w.shape[0] // num_heads
    heads = w.reshape(groups, num_heads // groups, D, *w.shape[1:])
    pooled = heads.mean(1) if how == "mean" else heads[:, 0]
    return pooled.reshape(groups * D, *w.shape[1:])


def _mha_weights(mha):
    """{q,k,v,o}_{weight,bias} and num_heads from an nn.MultiheadAttention or a dict."""
    if isinstance(mha, nn.MultiheadAttention):
        if mha.kdim != mha.embed_dim or mha.vdim != mha.embed_dim:
            raise ValueError(f"from_mha needs kdim == vdim == embed_dim, got embed_dim={mha.embed_dim}, "
                             f"kdim={mha.kdim}, vdim={mha.vdim}")
        E = mha.embed_dim
        if mha._qkv_same_embed_dim:
            wq, wk, wv = mha.in_proj_weight.split(E)
        else:
            wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        bq = bk = bv = None
        if mha.in_proj_bias is not None:
            bq, bk, bv = mha.in_proj_bias.split(E)
        if mha.bias_k is not None:
            raise ValueError("from_mha does not convert an nn.MultiheadAttention with add_bias_kv=True")
        return dict(num_heads=mha.num_heads, q_weight=wq, k_weight=wk, v_weight=wv, o_weight=mha.out_proj.weight,
                    q_bias=bq, k_bias=bk, v_bias=bv, o_bias=mha.out_proj.bias)
    if isinstance(mha, dict):
        need = ("num_heads", "q_weight", "k_weight", "v_weight", "o_weight")
        missing = [n for n in need if n not in mha]
        if missing:
            raise ValueError(f"a weight dict for from_mha needs keys {', '.join(need)}; missing {', '.join(missing)}")
        return {**dict(q_bias=None, k_bias=None, v_bias=None, o_bias=None), **mha}
    raise TypeError(f"mha must be an nn.MultiheadAttention or a dict of weights, got {type(mha).__name__}")


class _Attention(nn.Module):
    """q_proj (hidden -> hidden), k_proj and v_proj (hidden -> kv_heads * head_dim), out_proj."""

    def __init__(self, hidden_dim, num_heads, kv_heads, causal=False, dropout=0.0, bias=True):
        super().__init__()
        self.head_dim = head_dim_of(hidden_dim, num_heads)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.hidden_dim, self.num_heads, self.kv_heads = hidden_dim, num_heads, kv_heads
        self.causal, self.dropout = causal, float(dropout)
        kv = kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_dim, kv, bias=bias)
        self.v_proj = nn.Linear(hidden_dim, kv, bias=bias)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)

    def forward(self, x, kv_cache=None, return_kv=False):
        """x (B, S, hidden) -> (B, S, hidden); with return_kv also the (k, v) it would cache."""
        check_input(x, self.hidden_dim)
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self._kv(self.k_proj(x), B, S), self._kv(self.v_proj(x), B, S)
        if kv_cache is not None:
            kv_cache.append(k, v)
            o = kv_cache.attend(q, causal=self.causal)
        else:
            o = self._attend(q, k, v)
        out = self.out_proj(o.transpose(1, 2).reshape(B, S, self.hidden_dim))
        return (out, (k, v)) if return_kv else out

    def _dropout_attend(self, q, k, v):
        """Attention-probability dropout (as in nn.MultiheadAttention) needs PyTorch's SDPA."""
        if k.dim() == 3:
            k, v = k.unsqueeze(1), v.unsqueeze(1)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout, is_causal=self.causal,
                                              enable_gqa=k.shape[1] != q.shape[1])

    @classmethod
    def _from_weights(cls, mha, groups, kv_init, **kw):
        """A layer of this class with mha's Q and O weights and its K/V heads pooled into `groups`."""
        w = _mha_weights(mha)
        H = w["num_heads"]
        bias = w["q_bias"] is not None
        layer = cls(w["q_weight"].shape[1], H, bias=bias, **kw)
        with torch.no_grad():
            for name, proj, pool in (("q", layer.q_proj, False), ("k", layer.k_proj, True),
                                     ("v", layer.v_proj, True), ("o", layer.out_proj, False)):
                src_w, src_b = w[f"{name}_weight"], w[f"{name}_bias"]
                proj.weight.copy_(pool_kv_heads(src_w, H, groups, kv_init) if pool else src_w)
                if bias:
                    proj.bias.copy_(pool_kv_heads(src_b, H, groups, kv_init) if pool else src_b)
        return layer.to(device=w["q_weight"].device, dtype=w["q_weight"].dtype)


class FastMQALayer(_Attention):
    """Multi-query attention: H query heads, one shared K/V head of head_dim = hidden/H.

    use_flash=True runs `fastmqa.ops.mqa_attention` (a registry kernel on CUDA; its
    FlashAttention-2 backward); use_flash=False the plain-torch reference (autograd through
    it). dropout > 0 drops attention probabilities in training, which the fused kernels do
    not do: such a training step runs PyTorch's SDPA instead (documented, not silent).
    """

    def __init__(self, hidden_dim, num_heads, use_flash=True, causal=False, dropout=0.0, bias=True):
        super().__init__(hidden_dim, num_heads, 1, causal=causal, dropout=dropout, bias=bias)
        self.use_flash = bool(use_flash)

    @staticmethod
    def _kv(t, B, S):
        return t  # (B, S, D): the one shared head, the cache layout

    def _attend(self, q, k, v):
        if self.dropout and self.training:
            return self._dropout_attend(q, k, v)
        if self.use_flash:
            return mqa_attention(q, k, v, causal=self.causal)
        return attention_ref(q, k, v, causal=self.causal)

    @classmethod
    def from_mha(cls, mha, kv_init="mean", use_flash=True, causal=False, dropout=0.0):
        """Convert MHA weights (an nn.MultiheadAttention, or a dict with num_heads, q/k/v/o_weight
        and optional q/k/v/o_bias) to MQA by pooling the H K/V heads into one (`kv_init`)."""
        return cls._from_weights(mha, 1, kv_init, use_flash=use_flash, causal=causal, dropout=dropout)

    def extra_repr(self):
        return (f"hidden_dim={self.hidden_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"kv_heads=1, use_flash={self.use_flash}, causal={self.causal}")


class GQALayer(_Attention):
    """G K/V heads (G = H: MHA, G = 1: MQA), attention by PyTorch's SDPA: the baseline layer."""

    def __init__(self, hidden_dim, num_heads, kv_heads, causal=False, dropout=0.0, bias=True):
        if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or num_heads % kv_heads:
            raise ValueError(f"kv_heads must be a positive int dividing num_heads={num_heads}, got {kv_heads!r}")
        super().__init__(hidden_dim, num_heads, kv_heads, causal=causal, dropout=dropout, bias=bias)

    def _kv(self, t, B, S):
        return t.view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, G, S, D)

    def _attend(self, q, k, v):
        if self.dropout and self.training:
            return self._dropout_attend(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=self.kv_heads != self.num_heads)

    @classmethod
    def from_mha(cls, mha, kv_heads, kv_init="mean", causal=False, dropout=0.0):
        """MHA weights -> G K/V heads, pooling each group of H/G heads (`pool_kv_heads`)."""
        return cls._from_weights(mha, kv_heads, kv_init, kv_heads=kv_heads, causal=causal, dropout=dropout)

    def extra_repr(self):
        return (f"hidden_dim={self.hidden_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"kv_heads={self.kv_heads}, causal={self.causal}")


def cache_stats(cache_tensors, num_heads, head_dim, tokens) -> dict:
    """Statistics of the real cache tensors of one layer for `tokens` tokens, against the
    cache an MHA layer of the same num_heads and head_dim keeps for them in the same dtype."""
    stats = memory.stats_from_tensors(list(cache_tensors), memory.mha(num_heads, head_dim), tokens)
    stats["cache_shapes"] = [tuple(t.shape) for t in cache_tensors]
    return stats


class ProductionFastMQA(nn.Module):
    """The original project's model-facing layer: MQA, or MLA with enable_mla=True.

    forward(x, return_cache_stats=False) -> out, or (out, stats) with stats computed from the
    cache tensors this forward built (k and v of the shared head for MQA; the latent and
    its RoPE key for MLA) against an MHA layer of the same hidden_dim and num_heads.

    MLA: the latent width kv_lora_rank defaults to mla_compression x (2 * head_dim), i.e. the
    compression is relative to MQA's K+V width. rope_dim is the decoupled RoPE key shared by
    all heads; with rope_dim=0 and mla_compression=0.5 (hidden 2048, 32 heads) the cache is
    98.4 % smaller than MHA's (64x); with the default rope_dim=64 it is 96.9 % (32x, MQA's).
    """

    def __init__(self, hidden_dim, num_heads, enable_mla=False, mla_compression=0.5, rope_dim=64,
                 kv_lora_rank=None, causal=False):
        super().__init__()
        self.head_dim = head_dim_of(hidden_dim, num_heads)
        self.hidden_dim, self.num_heads, self.enable_mla = hidden_dim, num_heads, bool(enable_mla)
        if self.enable_mla:
            from .mla import MultiHeadLatentAttention
            self.attn = MultiHeadLatentAttention(hidden_dim, num_heads, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim,
                                                 mla_compression=mla_compression, causal=causal)
        else:
            self.attn = FastMQALayer(hidden_dim, num_heads, causal=causal)

    def forward(self, x, return_cache_stats=False, kv_cache=None):
        out, kv = self.attn(x, kv_cache=kv_cache, return_kv=True)
        if not return_cache_stats:
            return out
        if kv_cache is not None:  # the preallocated cache is what is held
            tensors, tokens = kv_cache.tensors(), kv_cache.batch * kv_cache.max_seq_len
        else:
            tensors, tokens = kv, x.shape[0] * x.shape[1]
        stats = cache_stats(tensors, self.num_heads, self.head_dim, tokens)
        stats["attention"] = "MLA" if self.enable_mla else "MQA"
        return out, stats
