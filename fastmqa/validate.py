"""Input validation shared by every public entry point.

Errors are for people: each names the argument, what it got and what was expected.
Checks run before anything is allocated, built or launched, and none reads tensor data
except `check_seqlens`' range check (one host sync, kept out of timed regions).
"""
from __future__ import annotations

import numbers

import torch

_INT32_MAX = 2**31 - 1
_FP32_MAX = float(torch.finfo(torch.float32).max)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ("," if t.dim() == 1 else "") + ")"


def _dtype(d) -> str:
    return str(d).replace("torch.", "")


def check_tensor(name, t, *, ndim=None, dtypes=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        want = " or ".join(f"{n}-D" for n in (ndim if isinstance(ndim, tuple) else (ndim,)))
        raise ValueError(f"{name} must be {want}, got {t.dim()}-D tensor of shape {_shape(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(_dtype(d) for d in dtypes)
        raise TypeError(f"{name} has dtype {_dtype(t.dtype)}, expected one of: {names}")
    if device is not None and t.device.type != device:
        raise ValueError(f"{name} is on {t.device}, expected a {device} tensor"
                         + (" (call .cuda() first)" if device == "cuda" else ""))


def check_qkv(q, k, v, kv_heads=1):
    """Validate q (B, H, Sq, D) and k, v (B, G, Skv, D) or (B, Skv, D).

    kv_heads: 1 for MQA, H for MHA, None for any G dividing H (GQA).
    Returns (B, H, Sq, Skv, D, G). Zero-sized B, H, Sq or Skv are accepted (the documented
    empty results); a head dim of 0 and non-floating dtypes are not.
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
    if D < 1:
        raise ValueError(f"q has head dim 0 (shape {_shape(q)}), expected a head dim >= 1")
    if q.dtype not in FLOAT_DTYPES:
        # An integer q would run through matmul and truncate the softmax to 0/1: refuse it.
        raise TypeError(f"q has dtype {_dtype(q.dtype)}, expected a floating dtype "
                        f"({', '.join(_dtype(d) for d in FLOAT_DTYPES)})")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got q {_dtype(q.dtype)}, k {_dtype(k.dtype)}, "
                        f"v {_dtype(v.dtype)}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    return B, H, Sq, Skv, D, G


def check_causal(causal):
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool (True or False), got {type(causal).__name__} {causal!r}")


def check_scale(scale):
    """None (1/sqrt(D)) or a finite positive real that float32 can hold (kernels compute in it)."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__} {scale!r}")
    s = float(scale)
    if not (s == s) or s in (float("inf"), float("-inf")) or s <= 0:
        raise ValueError(f"scale must be a finite positive float, got {scale}")
    if s > _FP32_MAX:
        raise ValueError(f"scale must be at most {_FP32_MAX:.4g} (float32's largest value; the kernels "
                         f"multiply scores by it in float32), got {scale}")


def check_index_range(B, H, Sq, Skv, D):
    """Kernels index with 32-bit ints: refuse sizes whose element count would overflow.

    q and out have B*H*Sq*D elements, k and v B*Skv*D. (The (B, H, Sq, Skv) scores exist
    only in the cuBLAS chapter's workspace, which checks its own size.)"""
    for name, n in (("q", B * H * Sq * D), ("k", B * Skv * D)):
        if n > _INT32_MAX:
            raise ValueError(f"{name} has {n} elements, more than 2**31 - 1 = {_INT32_MAX} that the kernels' "
                             f"32-bit indexing supports; split the batch")


def check_seqlens(seqlens, B, Skv, device, *, dtypes=(torch.int32,), name="cache_seqlens"):
    """cache_seqlens: (B,) integer lengths in [0, Skv] on `device` (None: any device)."""
    check_tensor(name, seqlens, ndim=1, dtypes=dtypes)
    if seqlens.shape[0] != B:
        raise ValueError(f"{name} must have shape ({B},) (one length per sequence), got {_shape(seqlens)}")
    want = None if device is None else torch.device(device)
    if want is not None and (seqlens.device.type != want.type
                             or (want.index is not None and seqlens.device.index not in (None, want.index))):
        raise ValueError(f"{name} is on {seqlens.device}, expected {device} like q")
    if B and (int(seqlens.min()) < 0 or int(seqlens.max()) > Skv):
        raise ValueError(f"{name} must lie in [0, {Skv}] (the cache length), got "
                         f"min {int(seqlens.min())} max {int(seqlens.max())}")
