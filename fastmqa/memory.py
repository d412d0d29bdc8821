"""The KV-cache memory model for MHA, GQA, MQA and MLA.

Per token and per layer a cache keeps, for every K/V head, a key and a value of head_dim
numbers; MLA (DeepSeek-V2) keeps instead one latent of kv_lora_rank numbers plus one
decoupled RoPE key of rope_dim numbers, shared by all heads.

    MHA  2 * H * D          MQA  2 * 1 * D  ->  1 - 1/H of MHA saved (96.875 % for H = 32)
    GQA  2 * G * D          MLA  kv_lora_rank + rope_dim
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8, torch.int8: 1}
if hasattr(torch, "float8_e4m3fn"):
    _BYTES[torch.float8_e4m3fn] = 1


def dtype_bytes(dtype) -> int:
    if dtype not in _BYTES:
        raise ValueError(f"dtype must be one of {sorted(str(d) for d in _BYTES)}, got {dtype}")
    return _BYTES[dtype]


@dataclass(frozen=True)
class CacheSpec:
    """What one layer caches per token."""
    name: str
    num_heads: int
    head_dim: int
    kv_heads: int | None = None     # MHA: num_heads, GQA: G, MQA: 1; None for MLA
    kv_lora_rank: int = 0           # MLA latent width
    rope_dim: int = 0               # MLA decoupled RoPE key width

    def __post_init__(self):
        for field in ("num_heads", "head_dim", "kv_heads", "kv_lora_rank", "rope_dim"):
            val = getattr(self, field)
            if field == "kv_heads" and val is None:
                continue
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"{field} must be an int, got {type(val).__name__} {val!r}")
            if val < (1 if field in ("num_heads", "head_dim") else 0):
                raise ValueError(f"{field} must be >= {1 if field in ('num_heads', 'head_dim') else 0}, got {val}")
        if self.kv_heads is not None and (self.kv_heads < 1 or self.num_heads % self.kv_heads):
            raise ValueError(f"kv_heads must divide num_heads={self.num_heads}, got {self.kv_heads}")
        if self.kv_heads is None and self.kv_lora_rank + self.rope_dim < 1:
            raise ValueError("an MLA cache needs kv_lora_rank + rope_dim >= 1")

    @property
    def numbers_per_token(self) -> int:
        if self.kv_heads is not None:
            return 2 * self.kv_heads * self.head_dim
        return self.kv_lora_rank + self.rope_dim


def mha(num_heads, head_dim):
    return CacheSpec("MHA", num_heads, head_dim, kv_heads=num_heads)


def gqa(num_heads, head_dim, groups):
    return CacheSpec(f"GQA-{groups}", num_heads, head_dim, kv_heads=groups)


def mqa(num_heads, head_dim):
    return CacheSpec("MQA", num_heads, head_dim, kv_heads=1)


def mla(num_heads, head_dim, kv_lora_rank=512, rope_dim=64):
    return CacheSpec("MLA", num_heads, head_dim, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim)


def bytes_per_token(spec: CacheSpec, dtype=torch.bfloat16, layers: int = 1) -> int:
    return spec.numbers_per_token * dtype_bytes(dtype) * layers


def cache_bytes(spec: CacheSpec, batch: int, seq_len: int, dtype=torch.bfloat16, layers: int = 1) -> int:
    for name, val in (("batch", batch), ("seq_len", seq_len), ("layers", layers)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be an int >= 0, got {val!r}")
    return bytes_per_token(spec, dtype, layers) * batch * seq_len


def reduction_percent(spec: CacheSpec, baseline: CacheSpec) -> float:
    """How much smaller `spec`'s cache is than `baseline`'s, in percent."""
    return 100.0 * (1.0 - spec.numbers_per_token / baseline.numbers_per_token)


def cache_multiplier(spec: CacheSpec, baseline: CacheSpec) -> float:
    """How many sequences fit in the memory one `baseline` sequence takes."""
    return baseline.numbers_per_token / spec.numbers_per_token


def stats_from_tensors(cache_tensors, baseline: CacheSpec, tokens: int, dtype=None) -> dict:
    """Cache statistics from the real cache tensors of one layer holding `tokens` tokens
    (summed over the batch), against what `baseline` would hold for the same tokens."""
    if not cache_tensors or isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"stats need at least one cache tensor and tokens >= 1, got {len(cache_tensors)} "
                         f"tensors and tokens={tokens!r}")
    used = sum(t.numel() * t.element_size() for t in cache_tensors)
    dtype = dtype or cache_tensors[0].dtype
    base = bytes_per_token(baseline, dtype) * tokens
    return {
        "cache_bytes": used,
        "baseline_bytes": base,
        "bytes_per_token": used / tokens if tokens else 0.0,
        "reduction_percent": 100.0 * (1.0 - used / base),
        "cache_multiplier": base / used,
    }


def measure_allocated(spec: CacheSpec, batch: int, seq_len: int, dtype=torch.bfloat16, layers: int = 1,
                      device="cuda") -> dict:
    """Allocate the cache on the GPU and read torch.cuda.memory_allocated before and after."""
    if not torch.cuda.is_available():
        raise RuntimeError("measure_allocated needs a CUDA GPU: torch.cuda.is_available() is False")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    n = spec.numbers_per_token
    tensors = [torch.empty(batch, seq_len, n, dtype=dtype, device=device) for _ in range(layers)]
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated(device)
    del tensors
    return {"model_bytes": cache_bytes(spec, batch, seq_len, dtype, layers), "allocated_bytes": after - before}
