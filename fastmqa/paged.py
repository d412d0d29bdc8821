"""A paged KV cache for MQA decoding (the layout of vLLM's PagedAttention), its checks and reference.

A dense cache reserves B x max_seq_len positions up front; with ragged sequences much of it is
never used. A paged cache keeps K and V of every sequence in one pool of fixed-size pages,

    k_pages, v_pages  (num_pages, P, D)     P = page_size tokens a page, one shared head (MQA)
    block_table       (B, max_pages) int32  logical page p of sequence b -> physical page
    cache_seqlens     (B,) int32            tokens held by each sequence

so key j of sequence b lives at ``k_pages[block_table[b, j // P], j % P]``. Pages come from a free
list as a sequence grows and go back when it ends: memory follows the tokens held, and a
sequence never needs a contiguous slab. Entries of block_table past ``ceil(seqlens[b] / P)`` are
never read (they may hold anything).

`paged_attention_ref` is the float reference (gather the pages, then `attention_ref`);
`fastmqa.prototypes.decode.mqa_decode_paged` is the split-KV prototype reading through the table;
`Kernel.prepare_paged` runs a registry decode kernel with paged=True (kernels/10_decode.cu, pages
a multiple of 64 tokens); `PagedKVCache` allocates pages, appends tokens and attends either way.
"""
from __future__ import annotations

import heapq

import torch

from . import validate
from .reference import attention_ref


def check_paged(k_pages, v_pages, block_table, seqlens, B=None, device=None):
    """Validate a paged cache; returns (num_pages, page_size, D, max_pages).

    k_pages, v_pages: (num_pages, P, D), one dtype and device; block_table: (B, max_pages) int32;
    seqlens: (B,) int32 in [0, max_pages * P]; the pages a sequence uses must exist. Reads the
    block table and the lengths (one host sync), like `validate.check_seqlens`."""
    validate.check_tensor("k_pages", k_pages, ndim=3)
    validate.check_tensor("v_pages", v_pages, ndim=3)
    if tuple(v_pages.shape) != tuple(k_pages.shape):
        raise ValueError(f"v_pages must have k_pages' shape {tuple(k_pages.shape)}, got {tuple(v_pages.shape)}")
    if v_pages.dtype != k_pages.dtype or v_pages.device != k_pages.device:
        raise ValueError(f"k_pages and v_pages must share dtype and device, got {k_pages.dtype} on {k_pages.device} "
                         f"and {v_pages.dtype} on {v_pages.device}")
    num_pages, P, D = k_pages.shape
    if P < 1 or D < 1:
        raise ValueError(f"k_pages must be (num_pages, page_size >= 1, D >= 1), got {tuple(k_pages.shape)}")
    validate.check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,))
    if B is not None and block_table.shape[0] != B:
        raise ValueError(f"block_table must have one row per sequence ({B}), got shape {tuple(block_table.shape)}")
    if block_table.device != k_pages.device:
        raise ValueError(f"block_table is on {block_table.device}, expected {k_pages.device} like k_pages")
    B, max_pages = block_table.shape
    validate.check_seqlens(seqlens, B, max_pages * P, k_pages.device if device is None else device)
    if B and max_pages:
        need = (seqlens.to(torch.long) + P - 1) // P                       # pages each sequence uses
        used = torch.arange(max_pages, device=block_table.device).view(1, -1) < need.view(-1, 1)
        bad = used & ((block_table < 0) | (block_table >= num_pages))
        if bool(bad.any()):
            b, p = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"block_table[{b}, {p}] = {int(block_table[b, p])} is not a page of the pool "
                             f"(0 <= page < {num_pages}); sequence {b} holds {int(seqlens[b])} tokens, "
                             f"{int(need[b])} pages of {P}")
    return num_pages, P, D, max_pages


def gather(k_pages, v_pages, block_table, seqlens):
    """The dense (B, max_pages * P, D) caches a paged cache stands for; zeros past each length."""
    num_pages, P, D, max_pages = check_paged(k_pages, v_pages, block_table, seqlens)
    B = block_table.shape[0]
    need = (seqlens.to(torch.long) + P - 1) // P
    used = torch.arange(max_pages, device=block_table.device).view(1, -1) < need.view(-1, 1)
    idx = torch.where(used, block_table.to(torch.long), torch.zeros_like(block_table, dtype=torch.long))
    keep = (torch.arange(max_pages * P, device=k_pages.device).view(1, -1, 1)
            < seqlens.to(device=k_pages.device, dtype=torch.long).view(-1, 1, 1))
    zero = torch.zeros((), dtype=k_pages.dtype, device=k_pages.device)
    k = torch.where(keep, k_pages[idx].reshape(B, max_pages * P, D), zero)   # where, not *: pages may hold NaN
    v = torch.where(keep, v_pages[idx].reshape(B, max_pages * P, D), zero)
    return k, v


def from_dense(k, v, seqlens, page_size, num_pages=None, pages=None, fill=0.0):
    """A paged copy of a dense MQA cache: k, v (B, 1, S, D) or (B, S, D); returns (k_pages,
    v_pages, block_table). Sequence b's ceil(seqlens[b] / page_size) pages are taken in order
    from `pages` (a permutation of range(num_pages); default 0, 1, 2, ...); the pool has
    `num_pages` pages (default: just enough); slots no sequence uses hold `fill` (NaN to test
    that a kernel never reads them)."""
    if k.dim() == 4:
        k, v = k.squeeze(1), v.squeeze(1)
    validate.check_tensor("k", k, ndim=3)
    B, S, D = k.shape
    validate.check_seqlens(seqlens, B, S, None)
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    lens = [int(x) for x in seqlens]
    need = [-(-L // page_size) for L in lens]
    num_pages = sum(need) if num_pages is None else num_pages
    order = list(range(num_pages)) if pages is None else [int(p) for p in pages]
    if sorted(order) != list(range(num_pages)) or sum(need) > num_pages:
        raise ValueError(f"pages must be a permutation of range({num_pages}) and hold {sum(need)} pages")
    max_pages = max(1, -(-S // page_size))
    k_pages = torch.full((num_pages, page_size, D), fill, dtype=k.dtype, device=k.device)
    v_pages = torch.full_like(k_pages, fill)
    table = torch.zeros(B, max_pages, dtype=torch.int32)
    it = iter(order)
    for b, L in enumerate(lens):
        for p in range(need[b]):
            page = next(it)
            table[b, p] = page
            n = min(page_size, L - p * page_size)
            k_pages[page, :n] = k[b, p * page_size:p * page_size + n]
            v_pages[page, :n] = v[b, p * page_size:p * page_size + n]
    return k_pages, v_pages, table.to(k.device)


def paged_attention_ref(q, k_pages, v_pages, block_table, seqlens, causal=False, scale=None, return_lse=False):
    """Attention of q (B, H, Sq, D) over a paged MQA cache, in q's dtype (the reference)."""
    B = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() == 4 else None
    validate.check_tensor("q", q, ndim=4)
    check_paged(k_pages, v_pages, block_table, seqlens, B=B)
    k, v = gather(k_pages, v_pages, block_table, seqlens)
    validate.check_qkv(q, k, v, kv_heads=1)
    return attention_ref(q, k.to(q.dtype), v.to(q.dtype), causal=causal, scale=scale, return_lse=return_lse,
                         seqlens=seqlens)


class PagedKVCache:
    """One layer's paged MQA cache for `batch` sequences: a pool of `num_pages` pages of
    `page_size` tokens, a block table of `max_pages_per_seq` pages a sequence (default: the
    whole pool), and each sequence's length. Pages are handed out lowest index first."""

    def __init__(self, num_pages, page_size, head_dim, batch, max_pages_per_seq=None,
                 dtype=torch.float32, device="cpu"):
        for name, val in (("num_pages", num_pages), ("page_size", page_size), ("head_dim", head_dim),
                          ("batch", batch)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        max_pages_per_seq = num_pages if max_pages_per_seq is None else max_pages_per_seq
        if isinstance(max_pages_per_seq, bool) or not isinstance(max_pages_per_seq, int) or max_pages_per_seq < 1:
            raise ValueError(f"max_pages_per_seq must be a positive int, got {max_pages_per_seq!r}")
        self.page_size, self.head_dim, self.batch = page_size, head_dim, batch
        opts = dict(dtype=dtype, device=device)
        self.k_pages = torch.zeros(num_pages, page_size, head_dim, **opts)
        self.v_pages = torch.zeros(num_pages, page_size, head_dim, **opts)
        self.block_table = torch.zeros(batch, max_pages_per_seq, dtype=torch.int32, device=device)
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self._free = list(range(num_pages))          # a heap: the lowest free page first
        self._pages = [[] for _ in range(batch)]      # host copies of each sequence's pages
        self._lens = [0] * batch

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[0]

    @property
    def lengths(self) -> list:
        return list(self._lens)

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - len(self._free)

    def append(self, k, v, lengths=None):
        """Append new tokens to every sequence: k, v (batch, T, D); sequence b takes the first
        lengths[b] of its T rows (default: all T). Takes pages from the pool as needed."""
        validate.check_tensor("k", k, ndim=3)
        validate.check_tensor("v", v, ndim=3)
        B, T, D = self.batch, k.shape[1], self.head_dim
        if tuple(k.shape) != (B, T, D) or tuple(v.shape) != (B, T, D):
            raise ValueError(f"k and v must be (batch={B}, T, head_dim={D}), got {tuple(k.shape)} and {tuple(v.shape)}")
        n = [T] * B if lengths is None else [int(x) for x in lengths]
        if len(n) != B or any(not 0 <= x <= T for x in n):
            raise ValueError(f"lengths must be {B} ints in [0, {T}], got {lengths!r}")
        P, max_pages = self.page_size, self.block_table.shape[1]
        new_len = [a + x for a, x in zip(self._lens, n)]
        if max(new_len) > max_pages * P:
            raise ValueError(f"a sequence may hold {max_pages * P} tokens ({max_pages} pages of {P}); "
                             f"this append needs {max(new_len)}")
        need = sum(-(-L // P) - len(pg) for L, pg in zip(new_len, self._pages))
        if need > len(self._free):
            raise RuntimeError(f"the page pool is exhausted: this append needs {need} more pages, "
                               f"{len(self._free)} of {self.num_pages} are free")
        for b, L in enumerate(new_len):
            while len(self._pages[b]) * P < L:
                self._pages[b].append(heapq.heappop(self._free))
        table = torch.tensor([pg + [0] * (max_pages - len(pg)) for pg in self._pages], dtype=torch.int32)
        self.block_table.copy_(table)
        # Token t < n[b] of sequence b goes to position lens[b] + t: (page, slot) from the host table.
        counts = torch.tensor(n, dtype=torch.long)
        bs = torch.repeat_interleave(torch.arange(B), counts)
        ts = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        if bs.numel():
            pos = torch.tensor(self._lens, dtype=torch.long)[bs] + ts
            page = table.to(torch.long)[bs, pos // P]
            dev = self.k_pages.device
            page, slot, bs, ts = page.to(dev), (pos % P).to(dev), bs.to(dev), ts.to(dev)
            self.k_pages[page, slot] = k[bs, ts].to(self.k_pages.dtype)
            self.v_pages[page, slot] = v[bs, ts].to(self.v_pages.dtype)
        self._lens = new_len
        self.cache_seqlens.copy_(torch.tensor(new_len, dtype=torch.int32))

    def free(self, b):
        """End sequence b: its pages return to the pool and its length is 0."""
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < self.batch:
            raise ValueError(f"b must be a sequence index in [0, {self.batch}), got {b!r}")
        for p in self._pages[b]:
            heapq.heappush(self._free, p)
        self._pages[b], self._lens[b] = [], 0
        self.block_table[b].zero_()
        self.cache_seqlens[b] = 0

    def dense(self):
        """(k, v): the dense (batch, max_pages * P, D) caches this one stands for."""
        return gather(self.k_pages, self.v_pages, self.block_table, self.cache_seqlens)

    def attend(self, q, causal=False, scale=None, return_lse=False, kernel=None):
        """Attention of q (batch, H, Sq, D) over the cache: by `kernel`, a registry decode kernel
        with paged=True (`Kernel.prepare_paged`, CUDA; pages a multiple of 64 tokens), or by the
        reference when kernel is None."""
        if kernel is None:
            return paged_attention_ref(q, self.k_pages, self.v_pages, self.block_table, self.cache_seqlens,
                                       causal=causal, scale=scale, return_lse=return_lse)
        run, o, lse = kernel.prepare_paged(q, self.k_pages, self.v_pages, self.block_table, self.cache_seqlens,
                                           causal=causal, scale=scale, return_lse=return_lse)
        run()
        return (o, lse) if return_lse else o

    def stats(self) -> dict:
        """Bytes of K and V held in pages in use, against a dense cache that reserves the
        longest sequence's length for every sequence (what a preallocated cache needs)."""
        per_token = 2 * self.head_dim * self.k_pages.element_size()
        tokens = sum(self._lens)
        paged = self.pages_in_use * self.page_size * per_token
        dense = self.batch * max(self._lens, default=0) * per_token
        return {"tokens": tokens, "pages_in_use": self.pages_in_use, "paged_bytes": paged, "dense_bytes": dense,
                "token_bytes": tokens * per_token,
                "waste_percent": 100.0 * (paged - tokens * per_token) / paged if paged else 0.0}
