"""Input validation shared by every public entry point.

Errors are for people: each names the argument, what it got and what was expected.
"""
from __future__ import annotations

import torch

_INT32_MAX = 2**31 - 1


def _shape(t) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(name, t, *, ndim=None, dtypes=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        want = " or ".join(f"{n}-D" for n in (ndim if isinstance(ndim, tuple) else (ndim,)))
        raise ValueError(f"{name} must be {want}, got {t.dim()}-D tensor of shape {_shape(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}, expected one of: {names}")
    if device is not None and t.device.type != device:
        raise ValueError(f"{name} is on {t.device}, expected a {device} tensor"
                         + (" (call .cuda() first)" if device == "cuda" else ""))


def check_qkv(q, k, v, kv_heads=1):
    """Validate q (B, H, Sq, D) and k, v (B, G, Skv, D) or (B, Skv, D).

    kv_heads: 1 for MQA, H for MHA, None for any G dividing H (GQA).
    Returns (B, H, Sq, Skv, D, G).
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=(3, 4))
    check_tensor("v", v, ndim=(3, 4))
    B, H, Sq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {_shape(k)} and v {_shape(v)}")
    if k.dim() == 3:
        Bk, Skv, Dk = k.shape
        G = 1
    else:
        Bk, G, Skv, Dk = k.shape
    if kv_heads == 1 and G != 1:
        raise ValueError(f"k must be (B, 1, Skv, D) or (B, Skv, D) for MQA (one shared K/V head), "
                         f"got {_shape(k)} with {G} K/V heads")
    if kv_heads is not None and kv_heads != 1 and G != kv_heads:
        raise ValueError(f"k must have {kv_heads} heads (B, {kv_heads}, Skv, D), got {_shape(k)}")
    if kv_heads is None and (G < 1 or H % G != 0):
        raise ValueError(f"k has {G} K/V heads, which must divide the {H} query heads of q {_shape(q)}")
    if Bk != B:
        raise ValueError(f"k has batch {Bk} but q {_shape(q)} has batch {B}")
    if Dk != D:
        raise ValueError(f"k has head dim {Dk} but q {_shape(q)} has head dim {D}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    return B, H, Sq, Skv, D, G


def check_scale(scale):
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not (scale == scale) or scale in (float("inf"), float("-inf")) or scale <= 0:
        raise ValueError(f"scale must be a finite positive float, got {scale}")


def check_index_range(B, H, Sq, Skv, D):
    """Kernels index with 32-bit ints: refuse sizes whose element count would overflow."""
    for name, n in (("q", B * H * Sq * D), ("k", B * Skv * D), ("scores", B * H * Sq * Skv)):
        if name == "scores":
            continue  # only materialised by the cuBLAS kernel, which checks its own workspace
        if n > _INT32_MAX:
            raise ValueError(f"{name} has {n} elements, more than 2**31 - 1 that the kernels' 32-bit "
                             f"indexing supports; split the batch")


def check_seqlens(seqlens, B, Skv, device):
    check_tensor("cache_seqlens", seqlens, ndim=1, dtypes=(torch.int32,))
    if seqlens.shape[0] != B:
        raise ValueError(f"cache_seqlens must have shape ({B},) (one length per sequence), got {_shape(seqlens)}")
    if seqlens.device != device:
        raise ValueError(f"cache_seqlens is on {seqlens.device}, expected {device} like q")
    if B and (int(seqlens.min()) < 0 or int(seqlens.max()) > Skv):
        raise ValueError(f"cache_seqlens must lie in [0, {Skv}] (the cache length), got "
                         f"min {int(seqlens.min())} max {int(seqlens.max())}")
