"""`mqa_attention`: the MQA operator that layers call, with autograd and torch.compile support.

    out = mqa_attention(q, k, v, causal=False, scale=None)
    out = forward(Q, K, V)            # the original project's `fastmqa_cuda.forward(Q, K, V)`

q is (B, H, Sq, D); k, v are the one shared K/V head, (B, 1, Skv, D) or (B, Skv, D); the
output is (B, H, Sq, D) in q's dtype and gradients come back in each input's own shape.

Two custom ops carry it (`torch.library.custom_op`), so `torch.compile(fullgraph=True)`
traces a model through them without graph breaks (each has a fake/meta implementation):

    fastmqa::mqa_fwd(q, k, v, causal, scale, impl) -> (out, lse)
    fastmqa::mqa_bwd(dout, q, k, v, out, lse, dlse, causal, scale) -> (dq, dk, dv)

The forward dispatches, on CUDA, to the best kernel of the registry (`fastmqa.kernels`) that
computes the log-sum-exp and supports the dtype, head dim and masking: the kernel's
capability fields choose it, not its name; with none, or on the CPU, it runs the
reference (`fastmqa.reference.attention_ref`, in fp32 for fp16/bf16 inputs). The backward
is FlashAttention-2's, written in torch: it recomputes P = exp(S * scale - lse) from the
saved log-sum-exp block of query rows by block, so it never holds more than one block of
the (Sq, Skv) score matrix per head, and sums dK and dV over the H heads that share them.
On CUDA, for fp16/bf16, the same algorithm runs as a kernel (`kernels/12_flash_bwd_wgmma.cu` on
Hopper, `kernels/07_flash_bwd.cu` elsewhere: the backward of the registry's latest tensor-core
kernel that runs here); `BACKWARD = "torch"` forces the torch version.

Fully masked rows (causal with Sq > Skv: query i sees no key) give zeros, lse = -inf and
zero gradients, never NaN. The backward itself is not differentiable (no double backward).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import validate
from .reference import attention_ref

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BWD_BLOCK_BYTES = 512 * 2**20   # the most fp32 score bytes the backward holds at once

_failed: set = set()             # kernels whose build failed here: not tried again
# "auto": the backward kernel of the registry (12_flash_bwd_wgmma, 07_flash_bwd) where it applies, else the
# torch implementation below; "torch": always the torch implementation (benchmarks compare them).
BACKWARD = "auto"


# -- choosing an implementation ------------------------------------------------------
def select_kernel(dtype, D, causal, device_type="cuda"):
    """The registry kernel `mqa_attention` uses for these inputs, or None (the reference).

    Candidates: prefill kernels that return the log-sum-exp (the backward needs it) and
    support dtype, D and causal. Among them the latest in course order wins: the registry
    lists kernels in the order the chapters improve them.
    """
    if device_type != "cuda":
        return None
    from . import kernels
    best = None
    for kern in kernels.REGISTRY:
        if (kern.kind == "prefill" and kern.returns_lse and kern.name not in _failed
                and kern.supports(dtype, D, causal) is None):
            best = kern
    return best


def select_backward(dtype, D, causal, device_type="cuda"):
    """The registry kernel whose backward kernel `mqa_bwd` uses for these inputs, or None (torch)."""
    if device_type != "cuda" or BACKWARD == "torch":
        return None
    if BACKWARD != "auto":
        raise ValueError(f"fastmqa.ops.BACKWARD must be 'auto' or 'torch', got {BACKWARD!r}")
    from . import kernels
    best = None  # as select_kernel: the latest in course order (12_flash_bwd_wgmma on Hopper, else 07)
    for kern in kernels.REGISTRY:
        if (kern.backward and f"{kern.name}:bwd" not in _failed and kern.returns_lse
                and kern.supports(dtype, D, causal) is None):
            best = kern
    return best


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast_off(fn):
    """A custom op's implementation runs below the autocast dispatch key, but autocast stays on
    for the torch calls inside it and would silently redo our fp32 work in bf16: switch it off."""
    @functools.wraps(fn)
    def wrapper(*args):
        with torch.autocast(device_type=args[0].device.type, enabled=False):  # q or dout: the device
            return fn(*args)
    return wrapper


def _reference_fwd(q, k, v, causal, scale):
    """Reference forward with lse; fp16/bf16 are computed in fp32 and rounded once."""
    if k.shape[1] == 0:  # nothing to attend to: the documented fully-masked result
        B, H, Sq, _ = q.shape
        return torch.zeros_like(q, memory_format=torch.contiguous_format), \
            torch.full((B, H, Sq), float("-inf"), dtype=_lse_dtype(q.dtype), device=q.device)
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    out, lse = attention_ref(q.to(work), k.to(work), v.to(work), causal=causal, scale=scale, return_lse=True)
    return out.to(q.dtype).contiguous(), lse.to(_lse_dtype(q.dtype)).contiguous()


# -- the forward op ----------------------------------------------------------------
@_autocast_off
def mqa_fwd_impl(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, impl: str) -> tuple[Tensor, Tensor]:
    """q (B, H, Sq, D), k, v (B, Skv, D) -> out (B, H, Sq, D), lse (B, H, Sq).

    impl: "" chooses (`select_kernel`), "reference" forces the reference, anything else names
    a registry kernel. Computes in q's dtype: autocast does not reach inside (`_autocast_off`).
    """
    D = q.shape[-1]
    if impl == "reference":
        kern = None
    elif impl:
        from . import kernels
        kern = kernels.get(impl)
    else:
        kern = select_kernel(q.dtype, D, causal, q.device.type)
    if kern is not None:
        try:
            out, lse = kern(q, k, v, causal=causal, scale=scale, return_lse=True)
            return _like(q, out), lse
        except Exception as e:  # noqa: BLE001 -- a kernel that cannot build must not break the model
            from .build import BuildError
            if impl or not isinstance(e, BuildError):
                raise
            _failed.add(kern.name)
            warnings.warn(f"fastmqa: kernel {kern.name} failed to build ({e}); using the reference "
                          "attention instead", RuntimeWarning, stacklevel=2)
    out, lse = _reference_fwd(q, k, v, causal, scale)
    return _like(q, out), lse


def _like(q, t):
    """t in the (B, Sq, H, D) memory layout (`kernels.empty_bshd`) that the fake implementations
    promise: a deterministic layout from the shape alone, the one a layer's projections have, so
    the transpose back to (B, S, hidden) is free. Kernels that write it cost no copy here."""
    from .kernels import bshd_strides, empty_bshd
    return t if t.stride() == bshd_strides(t.shape) else empty_bshd(q, dtype=t.dtype).copy_(t)


mqa_fwd = torch.library.custom_op("fastmqa::mqa_fwd", mqa_fwd_impl, mutates_args=())


@mqa_fwd.register_fake
def _(q, k, v, causal, scale, impl):
    B, H, Sq, D = q.shape
    from .kernels import empty_bshd
    return empty_bshd(q), q.new_empty((B, H, Sq), dtype=_lse_dtype(q.dtype))


# -- the backward op: FlashAttention-2's algorithm in torch ---------------------------
def _block_rows(B, H, Sq, Skv, itemsize):
    """Query rows per block so that one block's few (B, H, rows, Skv) temporaries fit the budget."""
    per_row = max(1, B * H * Skv * itemsize * 4)
    rows = max(1, BWD_BLOCK_BYTES // per_row)
    if rows >= 64:
        rows -= rows % 64
    return min(Sq, rows)


@_autocast_off
def mqa_bwd_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
                 causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of mqa_fwd: dq (B, H, Sq, D), dk, dv (B, Skv, D), in the inputs' dtypes.

    Per block of query rows i (all heads at once), with the key range cut at the causal edge:
        P   = exp(S * scale - lse_i)                  recomputed, not stored by the forward
        dV += sum_h P^T dO                            K/V are shared: sum over the H heads
        dP  = dO V^T,   D_i = rowsum(dO * O)
        dS  = P * (dP - D_i + dlse_i)                 dlse: the gradient reaching lse, if any
        dQ  = dS K * scale,   dK += sum_h dS^T Q * scale
    All in fp32 (fp64 for fp64 inputs), whatever the input dtype, autocast or not.
    """
    B, H, Sq, D = q.shape
    Skv = k.shape[1]
    kern = select_backward(q.dtype, D, causal, q.device.type)
    if kern is not None and k.dtype == v.dtype == q.dtype and lse.dtype == torch.float32:
        try:
            dq, dk, dv = kern.run_backward(dout.to(q.dtype), q, k, v, out, lse,
                                           dlse.float() if dlse is not None else None, causal, scale)
            return _like(q, dq), dk, dv
        except Exception as e:  # noqa: BLE001 -- as the forward: a failed build falls back, loudly
            from .build import BuildError
            if not isinstance(e, BuildError):
                raise
            _failed.add(f"{kern.name}:bwd")
            warnings.warn(f"fastmqa: the backward kernel of {kern.name} failed to build ({e}); using the "
                          "torch backward instead", RuntimeWarning, stacklevel=2)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros((B, H, Sq, D), dtype=work, device=q.device)
    dk = torch.zeros((B, Skv, D), dtype=work, device=q.device)
    dv = torch.zeros((B, Skv, D), dtype=work, device=q.device)
    if q.numel() and Skv:
        kw, vw = k.to(work), v.to(work)
        rows = _block_rows(B, H, Sq, Skv, torch.finfo(work).bits // 8)
        for i0 in range(0, Sq, rows):
            i1 = min(Sq, i0 + rows)
            # Keys past the causal edge of the block's last row are masked for every row in it.
            j1 = min(Skv, i1 - 1 + Skv - Sq + 1) if causal else Skv
            if j1 <= 0:
                continue  # every row of the block sees no key: its gradients are zero
            qb = q[:, :, i0:i1].to(work)
            dob = dout[:, :, i0:i1].to(work)
            lse_b = lse[:, :, i0:i1].to(work)
            # A fully masked row has lse = -inf; subtracting 0 there keeps exp(-inf) = 0, not NaN.
            lse_b = torch.where(torch.isfinite(lse_b), lse_b, torch.zeros_like(lse_b)).unsqueeze(-1)
            kb, vb = kw[:, :j1], vw[:, :j1]
            s = torch.matmul(qb, kb.unsqueeze(1).transpose(-1, -2)) * scale       # (B, H, r, j1)
            if causal:
                i = torch.arange(i0, i1, device=q.device).view(-1, 1)
                j = torch.arange(j1, device=q.device).view(1, -1)
                s = s.masked_fill(j > i + (Skv - Sq), float("-inf"))
            p = torch.exp(s - lse_b)
            del s
            dv[:, :j1] += torch.einsum("bhij,bhid->bjd", p, dob)
            dp = torch.matmul(dob, vb.unsqueeze(1).transpose(-1, -2))            # (B, H, r, j1)
            delta = (dob * out[:, :, i0:i1].to(work)).sum(-1, keepdim=True)
            if dlse is not None:
                delta = delta - dlse[:, :, i0:i1].to(work).unsqueeze(-1)
            ds = p * (dp - delta)
            del p, dp
            dq[:, :, i0:i1] = torch.matmul(ds, kb.unsqueeze(1)) * scale
            dk[:, :j1] += torch.einsum("bhij,bhid->bjd", ds, qb) * scale
    return _like(q, dq.to(q.dtype)), dk.to(k.dtype), dv.to(v.dtype)


mqa_bwd = torch.library.custom_op("fastmqa::mqa_bwd", mqa_bwd_impl, mutates_args=())


@mqa_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, causal, scale):
    from .kernels import empty_bshd
    return empty_bshd(q), k.new_empty(k.shape), v.new_empty(v.shape)  # the real op's layouts


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, _impl = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = mqa_bwd(dout, q, k, v, out, lse, dlse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("fastmqa::mqa_fwd", _backward, setup_context=_setup_context)


# -- the public functions -------------------------------------------------------------
def mqa_attention(q, k, v, causal=False, scale=None, return_lse=False, impl=None):
    """Multi-query attention: q (B, H, Sq, D); k, v (B, 1, Skv, D) or (B, Skv, D).

    causal: bottom-right aligned (query i sees keys j <= i + Skv - Sq).
    scale: softmax scale, default 1/sqrt(D).
    return_lse: also return the (B, H, Sq) log-sum-exp (fp32; fp64 for fp64 inputs).
    impl: None chooses (a registry kernel on CUDA, else the reference), "reference" forces
    the reference, a registry name forces that kernel.
    """
    B, H, Sq, Skv, D, _ = validate.check_qkv(q, k, v, kv_heads=1)
    validate.check_tensor("q", q, dtypes=DTYPES)
    validate.check_scale(scale)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if impl is not None and not isinstance(impl, str):
        raise TypeError(f"impl must be None, 'reference' or a registry kernel name, got {type(impl).__name__}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out, lse = mqa_fwd(q, k.reshape(B, Skv, D), v.reshape(B, Skv, D), causal, scale, impl or "")
    return (out, lse) if return_lse else out


def forward(Q, K, V):
    """The original project's API (`fastmqa_cuda.forward(Q, K, V)`): non-causal MQA with scale 1/sqrt(D)."""
    return mqa_attention(Q, K, V)


def gradient_errors(q, k, v, causal=False, seed=0):
    """Max |grad - fp64 grad| of `mqa_attention` and of PyTorch's own same-dtype autograd of
    the reference, for q, k, v, with one random upstream gradient. Returns {name: (ours, torch)}."""
    from .check import grads
    g = torch.Generator(device="cpu").manual_seed(seed)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    ref_fn = lambda *a: attention_ref(*a, causal=causal)
    ref = grads(ref_fn, q, k, v, dout, torch.float64, "cpu")
    ours = [t.double().cpu() for t in grads(lambda *a: mqa_attention(*a, causal=causal), q, k, v, dout, q.dtype, q.device)]
    theirs = [t.double().cpu() for t in grads(ref_fn, q, k, v, dout, q.dtype, q.device)]
    return {name: (float((o - r).abs().max()), float((t - r).abs().max()))
            for name, o, t, r in zip(("dq", "dk", "dv"), ours, theirs, ref)}
