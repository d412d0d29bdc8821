"""The tolerance rule, as in FlashAttention's tests.

A kernel's output is compared with the float64 reference. It passes when

    max|out - ref64| <= MULTIPLE * max|torch_out - ref64| + ATOL[dtype]

where `torch_out` is PyTorch's own computation of the same attention in the same dtype
on the same device (`fastmqa.reference.attention_ref`). The multiple is small and fixed;
the absolute floor only matters where PyTorch happens to be exact (e.g. Skv = 1, where
attention copies v). Nothing is loosened per kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import attention_ref, reference_fp64

MULTIPLE = 2.0
ATOL = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float64: 1e-12}


class ToleranceError(AssertionError):
    pass


@dataclass
class CheckResult:
    ok: bool
    max_err: float        # max |out - ref64|
    torch_err: float      # max |torch same-dtype - ref64|
    tol: float            # MULTIPLE * torch_err + ATOL
    rel_err: float        # ||out - ref|| / ||ref||
    where: tuple | None   # index of the worst element
    nan: bool

    def __str__(self):
        status = "ok" if self.ok else "FAIL"
        return (f"{status}: max err {self.max_err:.3e} vs tol {self.tol:.3e} "
                f"(= {MULTIPLE:g} x torch err {self.torch_err:.3e} + floor), rel {self.rel_err:.2e}")


def compare(out, q, k, v, causal=False, scale=None, seqlens=None, torch_out=None, ref=None, what="kernel"):
    """Compare `out` with the fp64 reference under the tolerance rule. Returns a CheckResult."""
    if ref is None:
        ref = reference_fp64(q, k, v, causal=causal, scale=scale, seqlens=seqlens)
    if torch_out is None:
        if q.dtype == torch.float32 and q.is_cuda:
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
            try:
                torch_out = attention_ref(q, k, v, causal=causal, scale=scale, seqlens=seqlens)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
        else:
            torch_out = attention_ref(q, k, v, causal=causal, scale=scale, seqlens=seqlens)
    return rule(out, torch_out, ref, q.dtype, what)


def rule(out, torch_out, ref, dtype, what="kernel"):
    """The tolerance rule on tensors already computed: `out` and PyTorch's same-dtype `torch_out`
    against the float64 `ref` (any devices; compared in float64 on the CPU)."""
    out64 = out.detach().double().cpu()
    if out64.shape != ref.shape:
        raise ToleranceError(f"{what}: output shape {tuple(out64.shape)} != reference {tuple(ref.shape)}")
    nan = bool(torch.isnan(out64).any())
    diff = (out64 - ref).abs()
    max_err = float(diff.max()) if diff.numel() else 0.0
    torch_err = float((torch_out.detach().double().cpu().reshape(ref.shape) - ref).abs().max()) if diff.numel() else 0.0
    tol = MULTIPLE * torch_err + ATOL.get(dtype, 1e-6)
    where = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0]) if diff.numel() and not nan else None
    rnorm = float(ref.norm())
    rel = float((out64 - ref).norm()) / rnorm if rnorm > 0 else float((out64 - ref).norm())
    return CheckResult(ok=(not nan) and max_err <= tol, max_err=max_err, torch_err=torch_err,
                       tol=tol, rel_err=rel, where=where, nan=nan)


def grads(fn, q, k, v, dout, dtype, device, dlse=None):
    """[dq, dk, dv] of fn(q, k, v) for the upstream gradient dout (and dlse, when fn returns
    (out, lse)), with fresh leaves of dtype on device: the gradients every gradient check compares."""
    leaves = [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    res = fn(*leaves)
    if dlse is None:
        res.backward(dout.to(device=device, dtype=dtype))
    else:
        torch.autograd.backward(list(res), [dout.to(device=device, dtype=res[0].dtype),
                                            dlse.to(device=device, dtype=res[1].dtype)])
    return [t.grad for t in leaves]


def assert_close(out, q, k, v, causal=False, scale=None, seqlens=None, what="kernel", **kw):
    """Raise ToleranceError with a readable message when `out` fails the tolerance rule."""
    r = compare(out, q, k, v, causal=causal, scale=scale, seqlens=seqlens, what=what, **kw)
    if not r.ok:
        shape = f"q {tuple(q.shape)} k {tuple(k.shape)} {str(q.dtype).replace('torch.', '')} causal={causal}"
        why = "output has NaN" if r.nan else f"worst element at (b, h, i, d) = {r.where}"
        raise ToleranceError(f"{what} on {shape}: {r}; {why}")
    return r
