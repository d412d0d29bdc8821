"""Generation with a KV cache: prefill the prompt, then decode one token at a time.

    model = DecoderLM(vocab_size=256, hidden_dim=128, num_heads=4, num_layers=2, attention="mqa")
    new_tokens = model.generate(prompt, max_new_tokens=16, lengths=[5, 9])    # greedy

`KVCache` preallocates every layer's cache once, (B, Smax, ...), and keeps `cache_seqlens`
(B,) int32, the valid length of each sequence (ragged batches). Per token and layer it holds

    MHA / GQA  k, v  (B, G, Smax, D)      G = H or the number of groups
    MQA        k, v  (B, Smax, D)         the one shared head
    MLA        k     (B, Smax, r + d_r)   the latent and its RoPE key; v is the latent too

A step is `cache.step(S)` (reserve S positions in every sequence), the layers' forward
(each writes its new keys at the reserved positions and attends over the cache), and for
a ragged prompt `cache.trim(lengths)`. Attention over the cache (`LayerCache.attend`): for
one shared head on CUDA, the registry's decode kernel (kind "decode", fed the cache and
cache_seqlens as they are); else, when every sequence has the same length, the prefill op
or PyTorch's SDPA over the valid prefix; else the reference with seqlens masking.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import memory
from .layers import FastMQALayer, GQALayer, head_dim_of
from .mla import MultiHeadLatentAttention
from .ops import mqa_attention, select_kernel
from .reference import attention_ref

KINDS = ("mha", "gqa", "mqa", "mla")


def select_decode_kernel(dtype, D, causal, Sq, device_type="cuda"):
    """The latest registry decode kernel supporting these inputs, or None."""
    if device_type != "cuda":
        return None
    from . import kernels
    best = None
    for kern in kernels.REGISTRY:
        if kern.kind == "decode" and kern.supports(dtype, D, causal, Sq) is None:
            best = kern
    return best


def _reference_seqlens(q, k, v, causal, scale, lens):
    """Reference attention over a ragged cache; fp16/bf16 computed in fp32."""
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    out = attention_ref(q.to(work), k.to(work), v.to(work), causal=causal, scale=scale, seqlens=lens)
    return out.to(q.dtype)


class KVCache:
    """Preallocated KV cache of `num_layers` layers for `batch` sequences of up to max_seq_len tokens.

    kind: "mha", "gqa" (kv_heads groups), "mqa" or "mla" (latent_dim = kv_lora_rank + rope_dim).
    """

    def __init__(self, kind, num_layers, batch, max_seq_len, num_heads, head_dim, kv_heads=None,
                 latent_dim=None, dtype=torch.float32, device="cpu"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        for name, val in (("num_layers", num_layers), ("batch", batch), ("max_seq_len", max_seq_len)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        G = {"mha": num_heads, "gqa": kv_heads, "mqa": 1, "mla": None}[kind]
        if kind == "gqa" and (not isinstance(kv_heads, int) or kv_heads < 1 or num_heads % kv_heads):
            raise ValueError(f"a GQA cache needs kv_heads dividing num_heads={num_heads}, got {kv_heads!r}")
        if kind == "mla" and (not isinstance(latent_dim, int) or latent_dim < 1):
            raise ValueError(f"an MLA cache needs latent_dim = kv_lora_rank + rope_dim >= 1, got {latent_dim!r}")
        self.kind, self.num_layers, self.batch, self.max_seq_len = kind, num_layers, batch, max_seq_len
        self.num_heads, self.head_dim, self.kv_heads, self.latent_dim = num_heads, head_dim, G, latent_dim
        if kind == "mla":
            shape = (batch, max_seq_len, latent_dim)
        elif kind == "mqa":
            shape = (batch, max_seq_len, head_dim)
        else:
            shape = (batch, G, max_seq_len, head_dim)
        opts = dict(dtype=dtype, device=device)
        self.k = [torch.zeros(shape, **opts) for _ in range(num_layers)]
        self.v = [None if kind == "mla" else torch.zeros(shape, **opts) for _ in range(num_layers)]
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=device)  # valid length, after the step
        self.start = torch.zeros(batch, dtype=torch.int32, device=device)          # where the step's tokens go
        self._lens = [0] * batch      # host copies: no device sync to plan a step
        self._start = [0] * batch
        self._slots = [LayerCache(self, i) for i in range(num_layers)]

    @classmethod
    def for_layer(cls, layer, batch, max_seq_len, num_layers=1, dtype=None, device=None):
        """A cache matching an attention layer (FastMQALayer, GQALayer, MultiHeadLatentAttention)."""
        p = next(layer.parameters())
        opts = dict(dtype=dtype or p.dtype, device=device or p.device)
        if isinstance(layer, MultiHeadLatentAttention):
            return cls("mla", num_layers, batch, max_seq_len, layer.num_heads, layer.head_dim,
                       latent_dim=layer.latent_dim, **opts)
        if isinstance(layer, FastMQALayer):
            return cls("mqa", num_layers, batch, max_seq_len, layer.num_heads, layer.head_dim, **opts)
        if isinstance(layer, GQALayer):
            kind = "mha" if layer.kv_heads == layer.num_heads else "gqa"
            return cls(kind, num_layers, batch, max_seq_len, layer.num_heads, layer.head_dim,
                       kv_heads=layer.kv_heads, **opts)
        raise TypeError(f"layer must be a FastMQALayer, GQALayer or MultiHeadLatentAttention, got {type(layer).__name__}")

    # -- bookkeeping ---------------------------------------------------------------
    def layer(self, i) -> "LayerCache":
        return self._slots[i]

    @property
    def lengths(self) -> list:
        return list(self._lens)

    def step(self, n):
        """Reserve n new positions (an int, or one per sequence) in every sequence."""
        n = [n] * self.batch if isinstance(n, int) else [int(x) for x in n]
        if len(n) != self.batch or min(n) < 0:
            raise ValueError(f"step takes an int >= 0 or {self.batch} of them, got {n}")
        new = [a + b for a, b in zip(self._lens, n)]
        if max(new) > self.max_seq_len:
            raise ValueError(f"the KV cache holds {self.max_seq_len} tokens per sequence; this step needs {max(new)}")
        self._start, self._lens = list(self._lens), new
        self.start.copy_(torch.tensor(self._start, dtype=torch.int32))
        self.cache_seqlens.copy_(torch.tensor(self._lens, dtype=torch.int32))

    def trim(self, lengths):
        """Set each sequence's valid length (after a right-padded prefill); the positions
        past it are overwritten by the next step."""
        lengths = [int(x) for x in lengths]
        if len(lengths) != self.batch or any(not s <= l <= e for s, l, e in zip(self._start, lengths, self._lens)):
            raise ValueError(f"lengths must lie between the step's start {self._start} and end {self._lens}, got {lengths}")
        self._lens = lengths
        self.cache_seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))

    def reset(self):
        self._lens, self._start = [0] * self.batch, [0] * self.batch
        self.cache_seqlens.zero_()
        self.start.zero_()

    def uniform_length(self):
        """The common valid length if every sequence has it, else None."""
        return self._lens[0] if len(set(self._lens)) == 1 else None

    # -- memory -------------------------------------------------------------------
    def tensors(self, layer=0) -> list:
        return [t for t in (self.k[layer], self.v[layer]) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for i in range(self.num_layers) for t in self.tensors(i))

    def stats(self) -> dict:
        """Per-layer statistics of the allocated tensors against an MHA cache of the same heads."""
        tokens = self.batch * self.max_seq_len
        return memory.stats_from_tensors(self.tensors(0), memory.mha(self.num_heads, self.head_dim), tokens)


def compare_caches(hidden_dim=4096, num_heads=32, groups=8, kv_lora_rank=None, rope_dim=64, mla_compression=0.5,
                   dtype=torch.bfloat16, batch=1, seq_len=256):
    """Allocate one layer's cache for MHA, GQA, MQA and MLA (with and without its RoPE key) and
    report each from the tensors themselves: shapes, bytes per token, reduction vs MHA."""
    from .mla import latent_rank
    H, D = num_heads, head_dim_of(hidden_dim, num_heads)
    r = latent_rank(D, mla_compression, kv_lora_rank)
    caches = [("MHA", KVCache("mha", 1, batch, seq_len, H, D, dtype=dtype)),
              (f"GQA-{groups}", KVCache("gqa", 1, batch, seq_len, H, D, kv_heads=groups, dtype=dtype)),
              ("MQA", KVCache("mqa", 1, batch, seq_len, H, D, dtype=dtype)),
              (f"MLA r={r} rope={rope_dim}", KVCache("mla", 1, batch, seq_len, H, D, latent_dim=r + rope_dim, dtype=dtype))]
    if rope_dim:
        caches.append((f"MLA r={r} rope=0", KVCache("mla", 1, batch, seq_len, H, D, latent_dim=r, dtype=dtype)))
    out = []
    for name, c in caches:
        st = c.stats()
        out.append(dict(cache=name, shapes=" + ".join(str(tuple(t.shape)) for t in c.tensors()),
                        bytes_per_token=st["bytes_per_token"], reduction_percent=round(st["reduction_percent"], 3),
                        multiplier=round(st["cache_multiplier"], 2)))
    return out


class LayerCache:
    """One layer's view of a KVCache: what a layer's forward receives as kv_cache."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index
        self.last_path = None  # the attention that ran last: a decode kernel's name, "mqa_attention:<kernel
        #                        or reference>", "sdpa" or "reference"
        self._prepared = {}

    @property
    def k(self):
        return self.cache.k[self.index]

    @property
    def v(self):
        v = self.cache.v[self.index]
        return self.k if v is None else v

    def tensors(self):
        return self.cache.tensors(self.index)

    @property
    def batch(self):
        return self.cache.batch

    @property
    def max_seq_len(self):
        return self.cache.max_seq_len

    def positions(self, S):
        """(B, S) absolute positions of the step's tokens."""
        c = self.cache
        return c.start.long().unsqueeze(1) + torch.arange(S, device=c.start.device)

    def mask(self, Sq, causal):
        """(B, 1, Sq, Smax) True where query i of the step may see key j (bottom-right, per length)."""
        c = self.cache
        lens = c.cache_seqlens.long().view(-1, 1, 1, 1)
        j = torch.arange(c.max_seq_len, device=lens.device).view(1, 1, 1, -1)
        m = j < lens
        if causal:
            i = torch.arange(Sq, device=lens.device).view(1, 1, -1, 1)
            m = m & (j <= i + lens - Sq)
        return m

    def append(self, k_new, v_new=None):
        """Write the step's keys (and values) at the reserved positions of every sequence.

        k_new: (B, S, D) for MQA, (B, G, S, D) for MHA/GQA, (B, S, r + d_r) for MLA.
        """
        c = self.cache
        S = k_new.shape[-2] if c.kind in ("mha", "gqa") else k_new.shape[1]
        if [e - s for s, e in zip(c._start, c._lens)] != [S] * c.batch:
            raise ValueError(f"the cache step reserved {[e - s for s, e in zip(c._start, c._lens)]} positions "
                             f"per sequence but the layer got {S} tokens; call cache.step({S}) first")
        pairs = [(self.k, k_new)] + ([] if v_new is None else [(self.cache.v[self.index], v_new)])
        if len(set(c._start)) == 1:  # one start: a slice copy
            s0 = c._start[0]
            for dst, src in pairs:
                (dst[:, :, s0:s0 + S] if c.kind in ("mha", "gqa") else dst[:, s0:s0 + S]).copy_(src)
            return
        b = torch.arange(c.batch, device=c.start.device).unsqueeze(1)
        pos = self.positions(S)
        for dst, src in pairs:
            if c.kind in ("mha", "gqa"):
                dst.transpose(1, 2)[b, pos] = src.transpose(1, 2).to(dst.dtype)
            else:
                dst[b, pos] = src.to(dst.dtype)

    def attend(self, q, causal, scale=None):
        """Attention of q (B, H, Sq, Dq) over the cache up to cache_seqlens -> (B, H, Sq, Dv)."""
        c = self.cache
        k, v, lens = self.k, self.v, c.cache_seqlens
        Sq, D = q.shape[2], q.shape[3]
        L = c.uniform_length()
        if c.kind in ("mqa", "mla"):
            kern = select_decode_kernel(q.dtype, D, causal, Sq, q.device.type)
            if kern is not None:
                self.last_path = kern.name
                return self._decode_kernel(kern, q, k, v, causal, scale)
            if L is not None:
                kern = select_kernel(q.dtype, D, causal, q.device.type)
                self.last_path = f"mqa_attention:{kern.name if kern is not None else 'reference'}"
                return mqa_attention(q, k[:, :L], v[:, :L], causal=causal, scale=scale)
        elif L is not None:
            self.last_path = "sdpa"
            kk, vv = k[:, :, :L], v[:, :, :L]
            mask = None
            if causal and Sq > 1:
                mask = self.mask(Sq, True)[..., :L]
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale,
                                                  enable_gqa=kk.shape[1] != q.shape[1])
        self.last_path = "reference"
        return _reference_seqlens(q, k, v, causal, scale, lens)

    def _decode_kernel(self, kern, q, k, v, causal, scale):
        """Launch a registry decode kernel; validated and prepared once per shape (the cache
        tensors and cache_seqlens are updated in place, so the prepared launch stays valid).
        A dense, 16-byte-aligned q (a one-token step's projection, viewed (B, H, 1, D)) is read
        where it lies and the output written to a new tensor: no copy kernel on either side.
        Other layouts go through a prepared q buffer, and the output is cloned."""
        direct = q.is_contiguous() and q.data_ptr() % 16 == 0
        key = (kern.name, tuple(q.shape), q.dtype, causal, scale, direct)
        entry = self._prepared.get(key)
        if entry is None:
            qbuf = q if direct else torch.empty(q.shape, dtype=q.dtype, device=q.device)
            launch, o, _ = kern.prepare(qbuf, k, v, causal=causal, scale=scale, cache_seqlens=self.cache.cache_seqlens)
            entry = self._prepared[key] = (None if direct else qbuf, launch, o)
        qbuf, launch, o = entry
        if direct:
            out = torch.empty_like(o)
            launch(q, out)
            return out
        qbuf.copy_(q)
        launch()
        return o.clone()


# -- a small decoder-only model -------------------------------------------------------
class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, attn, hidden_dim, mlp_ratio=4):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(hidden_dim, eps=1e-6), nn.RMSNorm(hidden_dim, eps=1e-6)
        self.attn = attn
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, mlp_ratio * hidden_dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * hidden_dim, hidden_dim))

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.norm1(x), kv_cache=kv_cache)
        return x + self.mlp(self.norm2(x))


def make_attention(kind, hidden_dim, num_heads, kv_heads=None, kv_lora_rank=None, rope_dim=16, causal=True):
    """A causal attention layer of the given kind: "mha", "gqa" (kv_heads), "mqa" or "mla"."""
    if kind == "mqa":
        return FastMQALayer(hidden_dim, num_heads, causal=causal)
    if kind == "mha":
        return GQALayer(hidden_dim, num_heads, num_heads, causal=causal)
    if kind == "gqa":
        return GQALayer(hidden_dim, num_heads, kv_heads, causal=causal)
    if kind == "mla":
        return MultiHeadLatentAttention(hidden_dim, num_heads, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, causal=causal)
    raise ValueError(f"attention must be one of {', '.join(KINDS)}, got {kind!r}")


class DecoderLM(nn.Module):
    """Token + position embedding, num_layers blocks (attention of the chosen kind + MLP), LM head."""

    def __init__(self, vocab_size=256, hidden_dim=128, num_heads=4, num_layers=2, attention="mqa", kv_heads=None,
                 max_seq_len=512, mlp_ratio=4, kv_lora_rank=None, rope_dim=16):
        super().__init__()
        head_dim_of(hidden_dim, num_heads)
        self.attention, self.max_seq_len = attention, max_seq_len
        self.tok_emb = nn.Embedding(vocab_size, hidden_dim)
        self.pos_emb = nn.Embedding(max_seq_len, hidden_dim)
        self.blocks = nn.ModuleList(
            Block(make_attention(attention, hidden_dim, num_heads, kv_heads, kv_lora_rank, rope_dim), hidden_dim, mlp_ratio)
            for _ in range(num_layers))
        self.norm = nn.RMSNorm(hidden_dim, eps=1e-6)
        self.lm_head = nn.Linear(hidden_dim, vocab_size, bias=False)

    def new_cache(self, batch, max_seq_len=None, dtype=None) -> KVCache:
        return KVCache.for_layer(self.blocks[0].attn, batch, max_seq_len or self.max_seq_len,
                                 num_layers=len(self.blocks), dtype=dtype)

    def forward(self, tokens, cache: KVCache | None = None):
        """tokens (B, S) -> logits (B, S, vocab). With a cache, call cache.step(S) first."""
        B, S = tokens.shape
        pos = cache.layer(0).positions(S) if cache is not None else torch.arange(S, device=tokens.device)
        h = self.tok_emb(tokens) + self.pos_emb(pos)
        for i, blk in enumerate(self.blocks):
            h = blk(h, cache.layer(i) if cache is not None else None)
        return self.lm_head(self.norm(h))

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens, lengths=None, return_logits=False):
        """Greedy generation with the KV cache. prompt (B, P), right-padded to P when the
        sequences have `lengths`; returns the new tokens (B, max_new_tokens) (and their logits)."""
        B, P = prompt.shape
        lengths = [P] * B if lengths is None else [int(n) for n in lengths]
        if len(lengths) != B or min(lengths) < 1 or max(lengths) > P:
            raise ValueError(f"lengths must hold {B} ints in [1, {P}], got {lengths}")
        need = max(P, max(lengths) + max_new_tokens)
        if need > self.max_seq_len:
            raise ValueError(f"prompt and new tokens need {need} positions; the model has max_seq_len={self.max_seq_len}")
        cache = self.new_cache(B, need)
        cache.step(P)
        logits = self(prompt, cache)
        cache.trim(lengths)
        last = logits[torch.arange(B), torch.tensor(lengths, device=prompt.device) - 1]
        out, outs_logits = [], []
        for t in range(max_new_tokens):
            nxt = last.argmax(-1)
            out.append(nxt)
            outs_logits.append(last)
            if t + 1 == max_new_tokens:
                break
            cache.step(1)
            last = self(nxt.unsqueeze(1), cache)[:, -1]
        tokens = torch.stack(out, 1)
        return (tokens, torch.stack(outs_logits, 1)) if return_logits else tokens

    @torch.no_grad()
    def generate_recompute(self, prompt, max_new_tokens, lengths=None, return_logits=False):
        """The same greedy generation without a cache: every step runs the whole sequence
        again, one sequence at a time. The check for `generate`."""
        B, P = prompt.shape
        lengths = [P] * B if lengths is None else [int(n) for n in lengths]
        toks, logs = [], []
        for b in range(B):
            seq = prompt[b:b + 1, :lengths[b]]
            mine, my_logits = [], []
            for _ in range(max_new_tokens):
                last = self(seq)[:, -1]
                nxt = last.argmax(-1)
                mine.append(nxt)
                my_logits.append(last)
                seq = torch.cat([seq, nxt.unsqueeze(1)], 1)
            toks.append(torch.cat(mine))
            logs.append(torch.cat(my_logits))
        tokens = torch.stack(toks)
        return (tokens, torch.stack(logs)) if return_logits else tokens
