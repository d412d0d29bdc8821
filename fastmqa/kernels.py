"""The one registry of every kernel in the course.

Tests, benchmarks, the GPU check and the book all iterate `REGISTRY`; adding a kernel is
one `Kernel(...)` entry below plus its `kernels/NN_name.cu`. Each entry is callable with
the reference's signature:

    out = get("01_naive")(q, k, v, causal=False, scale=None)          # prefill
    out = get("20_decode")(q, k_cache, v_cache, cache_seqlens=lens)   # decode

q is (B, H, Sq, D); k, v are (B, 1, Skv, D) or (B, Skv, D); the output is (B, H, Sq, D).
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import validate

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16


@dataclass(frozen=True)
class Kernel:
    name: str                       # numbered, course order: "01_naive"
    title: str                      # one line for tables
    kind: str                       # "prefill" or "decode"
    source: str                     # file in kernels/
    chapter: str                    # notebook that teaches it
    dtypes: tuple = (FP32,)
    head_dims: tuple = (64, 128)
    causal: bool = True             # supports causal=True
    max_sq: int | None = None       # decode kernels: the most query rows per sequence
    uses_cublas: bool = False
    workspace: Callable | None = None   # (B, H, Sq, Skv, D, dtype, num_splits) -> bytes
    returns_lse: bool = False       # fills the (B, H, Sq) float32 log-sum-exp
    prototype: str | None = None    # "module:function" of its numba.cuda prototype
    suites: tuple = ()              # benchmark suites it appears in
    backward: str | None = None     # file in kernels/ of its backward kernel (same dtypes, head dims)
    strided_q: bool = False         # reads q and o through their strides (views need no copy)
    backward_prototype: str | None = None  # "module:function" of its backward's numba.cuda prototype
    paged: bool = False             # a decode kernel that also reads a paged cache (prepare_paged)
    arch: tuple | None = None       # the one compute capability its code targets (wgmma: (9, 0)), else any
    paths: tuple = ()               # num_splits values that force its other code paths (a prefill kernel's
                                    # cfg): gpucheck runs the grid and the sanitizers on each of them too
    extra: dict = field(default_factory=dict)

    # -- calling -----------------------------------------------------------------
    def supports(self, dtype, D, causal, Sq=None) -> str | None:
        """None if supported, else the reason."""
        if dtype not in self.dtypes:
            return f"dtype {str(dtype).replace('torch.', '')} (supports {', '.join(str(d).replace('torch.', '') for d in self.dtypes)})"
        if D not in self.head_dims:
            return f"head dim {D} (supports {', '.join(map(str, self.head_dims))})"
        if causal and not self.causal:
            return "causal=True"
        if self.max_sq is not None and Sq is not None and Sq > self.max_sq:
            return f"Sq={Sq} query rows (a decode kernel takes at most {self.max_sq})"
        if self.arch is not None and torch.cuda.is_available() and torch.cuda.get_device_capability() != self.arch:
            have = "%d.%d" % torch.cuda.get_device_capability()
            return f"this GPU (compute capability {have}; the kernel needs {self.arch[0]}.{self.arch[1]})"
        return None

    def __call__(self, q, k, v, causal=False, scale=None, cache_seqlens=None, num_splits=0, return_lse=False):
        run, o, lse = self.prepare(q, k, v, causal, scale, cache_seqlens, num_splits, return_lse)
        run()
        return (o, lse) if return_lse else o

    def prepare(self, q, k, v, causal=False, scale=None, cache_seqlens=None, num_splits=0, return_lse=False):
        """Validate, allocate and build once; return (launch, out, lse) where launch() only
        enqueues the kernel (launch(q2, o2): on other tensors laid out exactly as q and out).
        Benchmarks time launch() so no validation (and no host sync, such as the cache_seqlens
        range check) sits inside the timed region."""
        B, H, Sq, Skv, D, _ = validate.check_qkv(q, k, v, kv_heads=1)
        self._check_call(q, D, Sq, causal, scale)
        validate.check_index_range(B, H, Sq, Skv, D)
        if cache_seqlens is not None:
            if self.kind != "decode":
                raise ValueError(f"cache_seqlens is only taken by decode kernels; {self.name} is a {self.kind} kernel")
            validate.check_seqlens(cache_seqlens, B, Skv, q.device)
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
            raise ValueError(f"num_splits must be an int >= 0 (0 = choose), got {num_splits!r}")
        if return_lse and not self.returns_lse:
            raise ValueError(f"kernel {self.name} does not compute the log-sum-exp (return_lse=True)")
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        # A strided kernel takes q as it is (e.g. a (B, Sq, H, D) projection viewed as (B, H, Sq, D))
        # and writes o in the (B, Sq, H, D) layout (`empty_bshd`), so a layer's transposes on both
        # sides cost no copy.
        strided = self.strided_q and _rows_aligned(q)
        o = empty_bshd(q) if self.strided_q else torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
        if o.numel() == 0 or Skv == 0:
            # Nothing to compute, or nothing to attend to: the documented fully-masked result.
            def launch():
                o.zero_()
                lse.fill_(float("-inf"))
            return launch, o, lse
        # Oddly strided inputs are made contiguous (documented): kernels assume dense rows.
        if not strided:
            q = _aligned(q.contiguous())
        k = _aligned(k.reshape(B, Skv, D).contiguous())
        v = _aligned(v.reshape(B, Skv, D).contiguous())
        ws_bytes = self.workspace(B, H, Sq, Skv, D, q.dtype, num_splits) if self.workspace else 0
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=q.device)
        lens = cache_seqlens if cache_seqlens is not None else torch.empty(0, dtype=torch.int32, device=q.device)
        lse_arg = lse if (self.returns_lse or return_lse) else torch.empty(0, device=q.device)
        mod = self.module()
        ns = int(num_splits)

        def launch(q_in=None, o_out=None):
            # q_in / o_out: other tensors with the exact shape, dtype, device and strides of the
            # q the kernel was prepared with (after the copies above) and of o, 16-byte aligned:
            # the caller checks (KVCache's decode steps: a new projection and output every step).
            mod.run(q if q_in is None else q_in, k, v, o if o_out is None else o_out, lse_arg, lens, ws, scale,
                    causal, ns)
        return launch, o, lse

    def _check_call(self, q, D, Sq, causal, scale):
        """The checks every forward entry makes after the shapes: q a CUDA tensor of a supported
        dtype, scale, causal a bool, and the configuration supported."""
        validate.check_tensor("q", q, dtypes=self.dtypes, device="cuda")
        validate.check_scale(scale)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        why = self.supports(q.dtype, D, causal, Sq)
        if why is not None:
            raise ValueError(f"kernel {self.name} does not support {why}")

    def module(self):
        """The built extension of this entry (built once, cached): `run`, and `run_paged` if paged."""
        from .build import load
        return load(self.name, self.source, self.uses_cublas, strided=self.strided_q, paged=self.paged)

    def prepare_paged(self, q, k_pages, v_pages, block_table, cache_seqlens, causal=False, scale=None,
                      num_splits=0, return_lse=False):
        """`prepare` for a paged cache (fastmqa.paged): q (B, H, Sq, D); k_pages, v_pages
        (num_pages, page_size, D); block_table (B, max_pages) int32; cache_seqlens (B,) int32.
        A page must hold whole 64-key tiles (page_size a multiple of 64). Returns (launch, out, lse)."""
        from .paged import check_paged
        if not self.paged:
            raise ValueError(f"kernel {self.name} does not read a paged cache (registry entries with paged=True do)")
        validate.check_tensor("q", q, ndim=4)
        B, H, Sq, D = q.shape
        num_pages, P, Dk, max_pages = check_paged(k_pages, v_pages, block_table, cache_seqlens, B=B, device=q.device)
        if Dk != D:
            raise ValueError(f"k_pages must have q's head dim {D}, got {Dk}")
        if P % 64:
            raise ValueError(f"page_size must be a multiple of 64 for kernel {self.name} (a page holds whole "
                             f"64-key tiles), got {P}")
        self._check_call(q, D, Sq, causal, scale)
        if k_pages.dtype != q.dtype:
            raise TypeError(f"k_pages has dtype {str(k_pages.dtype)[6:]}, expected q's {str(q.dtype)[6:]}")
        Skv = max_pages * P
        validate.check_index_range(B, H, Sq, Skv, D)
        validate.check_index_range(1, 1, 1, num_pages * P, D)
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
            raise ValueError(f"num_splits must be an int >= 0 (0 = choose), got {num_splits!r}")
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
        if o.numel() == 0:
            return (lambda: None), o, lse
        q = _aligned(q.contiguous())
        k_pages, v_pages = _aligned(k_pages.contiguous()), _aligned(v_pages.contiguous())
        table, lens = block_table.contiguous(), cache_seqlens.contiguous()
        ws = torch.empty(self.workspace(B, H, Sq, Skv, D, q.dtype, num_splits) if self.workspace else 0,
                         dtype=torch.uint8, device=q.device)
        lse_arg = lse if (self.returns_lse or return_lse) else torch.empty(0, device=q.device)
        mod = self.module()
        ns = int(num_splits)

        def launch():
            mod.run_paged(q, k_pages, v_pages, o, lse_arg, table, lens, ws, scale, causal, ns)
        return launch, o, lse

    def prepare_backward(self, dout, q, k, v, out, lse, dlse=None, causal=False, scale=None):
        """The backward kernel's (launch, dq, dk, dv) for gradients of this kernel's forward:
        q, dout, out (B, H, Sq, D); k, v (B, 1, Skv, D) or (B, Skv, D); lse (B, H, Sq) float32 from
        the forward (return_lse=True); dlse: the gradient reaching lse, or None. dq comes back in
        the (B, Sq, H, D) layout (`empty_bshd`), dk, dv as (B, Skv, D); all in q's dtype."""
        if self.backward is None:
            raise ValueError(f"kernel {self.name} has no backward kernel")
        B, H, Sq, Skv, D, _ = validate.check_qkv(q, k, v, kv_heads=1)
        validate.check_tensor("q", q, dtypes=self.dtypes, device="cuda")
        validate.check_scale(scale)
        why = self.supports(q.dtype, D, causal, Sq)
        if why is not None:
            raise ValueError(f"kernel {self.name}'s backward does not support {why}")
        for name, t, shape, dtype in (("dout", dout, (B, H, Sq, D), q.dtype), ("out", out, (B, H, Sq, D), q.dtype),
                                      ("lse", lse, (B, H, Sq), torch.float32)):
            validate.check_tensor(name, t, dtypes=(dtype,), device="cuda")
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if dlse is not None:
            validate.check_tensor("dlse", dlse, dtypes=(torch.float32,), device="cuda")
            if tuple(dlse.shape) != (B, H, Sq):
                raise ValueError(f"dlse must have shape {(B, H, Sq)}, got {tuple(dlse.shape)}")
        validate.check_index_range(B, H, Sq, Skv, D)
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        k = _aligned(k.reshape(B, Skv, D).contiguous())
        v = _aligned(v.reshape(B, Skv, D).contiguous())
        # q is read where it lies (16-byte rows); out, dout and dq share the (B, Sq, H, D) layout
        # of the forward's output (`empty_bshd`): a layer's views need no copy.
        if not _rows_aligned(q):
            q = _aligned(q.contiguous())
        dq = empty_bshd(q)
        out, dout = (t if t.stride() == dq.stride() and t.data_ptr() % 16 == 0 else empty_bshd(q).copy_(t)
                     for t in (out, dout))
        dk = torch.empty((B, Skv, D), dtype=q.dtype, device=q.device)
        dv = torch.empty((B, Skv, D), dtype=q.dtype, device=q.device)
        if dq.numel() == 0 or Skv == 0:
            def launch():
                dq.zero_(); dk.zero_(); dv.zero_()
            return launch, dq, dk, dv
        lse = lse.contiguous()
        dlse_arg = dlse.contiguous() if dlse is not None else torch.empty(0, device=q.device)
        num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        ws = torch.empty(_bwd_workspace(B, H, Sq, Skv, D, causal, num_sms), dtype=torch.uint8, device=q.device)
        from .build import backward_name, load
        mod = load(backward_name(self), self.backward, backward=True)

        def launch():
            mod.run_bwd(dout, q, k, v, out, lse, dlse_arg, dq, dk, dv, ws, scale, causal)
        return launch, dq, dk, dv

    def run_backward(self, dout, q, k, v, out, lse, dlse=None, causal=False, scale=None):
        """(dq, dk, dv) of this kernel's forward by its backward kernel (see prepare_backward)."""
        launch, dq, dk, dv = self.prepare_backward(dout, q, k, v, out, lse, dlse, causal, scale)
        launch()
        return dq, dk, dv

    def backward_prototype_fn(self):
        if self.backward_prototype is None:
            return None
        mod, fn = self.backward_prototype.split(":")
        return getattr(importlib.import_module(mod), fn)

    def prototype_fn(self):
        if self.prototype is None:
            return None
        mod, fn = self.prototype.split(":")
        return getattr(importlib.import_module(mod), fn)


def _scores_bytes(B, H, Sq, Skv, D, dtype, num_splits):
    return B * H * Sq * Skv * 4


def _split_kv_bytes(B, H, Sq, Skv, D, dtype, num_splits):
    """Bytes of 09_flash_3xtf32's workspace: K's two TF32 parts and V's three, Skv padded to its 32-key tile."""
    return 5 * B * (-(-Skv // 32) * 32) * D * 4


def empty_bshd(q, dtype=None):
    """An uninitialised (B, H, Sq, D) tensor like q whose memory is (B, Sq, H, D): the layout the
    strided kernels write, the layout of a layer's projections (so `o.transpose(1, 2)` is free)."""
    B, H, Sq, D = q.shape
    return torch.empty((B, Sq, H, D), dtype=dtype or q.dtype, device=q.device).transpose(1, 2)


def bshd_strides(shape) -> tuple:
    """The strides `empty_bshd` gives a (B, H, Sq, D) tensor."""
    B, H, Sq, D = shape
    return (Sq * H * D, D, H * D, 1)


def _aligned(t):
    """t, or a copy of it when its start address is not a multiple of 16 bytes (a contiguous view
    at an odd offset): the kernels read rows in 16-byte chunks and by bulk copies."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _rows_aligned(t) -> bool:
    """t's rows can be read in 16-byte chunks where they lie: unit stride in the head dim, other
    strides and the start address multiples of 16 bytes."""
    e = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((s * e) % 16 == 0 or n == 1 for s, n in zip(t.stride()[:-1], t.shape[:-1])))


def _bwd_head_groups(B, H, Skv, causal, num_sms):
    """(G, HG): the head groups of the backward's dK/dV kernel (kernels/flash_bwd.cuh: head_groups())."""
    ctas = B * -(-Skv // 64)
    G = max(1, min(H, (8 if causal else 2) * num_sms // max(1, ctas)))
    HG = -(-H // G)
    return -(-H // HG), HG


def _bwd_workspace(B, H, Sq, Skv=0, D=0, causal=False, num_sms=None):
    """Bytes of the backward kernel's workspace: per-row lse (log2 units) and delta, rows padded to
    64; plus fp32 dK, dV partials of each head group when it splits the heads (`_bwd_head_groups`)."""
    if num_sms is None:
        num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count \
            if torch.cuda.is_available() else 132
    G, _ = _bwd_head_groups(B, H, Skv, causal, num_sms)
    return 2 * 4 * B * H * (-(-Sq // 64) * 64) + (2 * 4 * G * B * Skv * D if G > 1 else 0)


def _decode_workspace(B, H, Sq, Skv, D, dtype, num_splits):
    """Bytes of the decode kernels' split-KV partials: fp32 (splits, B, H*Sq, D) outputs + (splits, B, H*Sq) lse.

    An upper bound of the split count their launchers use: a given num_splits is clamped to the
    number of key tiles (tiles are >= 32 keys) and 256; a chosen one is at most 256, the number of
    tiles, and 2 waves of <= 4 resident CTAs per SM over B sequences (ceil(8 * SMs / B))."""
    tiles = -(-Skv // 32)
    if num_splits:
        splits = min(num_splits, tiles, 256)
    else:
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count \
            if torch.cuda.is_available() else 132
        splits = min(tiles, 256, max(1, -(-8 * sms // max(B, 1))))
    return 0 if splits <= 1 else splits * B * H * Sq * (D + 1) * 4


REGISTRY: list[Kernel] = [
    # --- fp32 chapters: naive -> shared memory -> warp primitives -> cuBLAS -------------
    Kernel("01_naive", "naive: one thread per (b, h, i) query row", "prefill", "01_naive.cu",
           "02_naive", prototype="fastmqa.prototypes.naive:mqa_naive", suites=("fp32",)),
    Kernel("02_smem_tiled", "shared memory: one K/V tile serves every head of the block", "prefill",
           "02_smem_tiled.cu", "03_smem", returns_lse=True,
           prototype="fastmqa.prototypes.smem_tiled:mqa_smem_tiled", suites=("fp32",)),
    Kernel("03_warp_shuffle", "warp primitives: a warp per query row, shuffle reductions", "prefill",
           "03_warp_shuffle.cu", "04_warp", returns_lse=True,
           prototype="fastmqa.prototypes.warp_shuffle:mqa_warp_shuffle", suites=("fp32",)),
    Kernel("04_cublas", "cuBLAS: heads folded into M, two strided-batched SGEMMs + softmax", "prefill",
           "04_cublas.cu", "05_cublas", uses_cublas=True, workspace=_scores_bytes, returns_lse=True,
           prototype="fastmqa.prototypes.cublas:mqa_cublas", suites=("fp32",)),
    # --- fused online softmax and tensor cores -------------------------------------------
    Kernel("05_flash_fp32", "fused online softmax, fp32 CUDA cores; one K/V tile serves all heads",
           "prefill", "05_flash_fp32.cu", "06_flash_fp32", returns_lse=True,
           prototype="fastmqa.prototypes.flash:mqa_flash", suites=("fp32",)),
    Kernel("06_flash_mma", "tensor cores: mma.sync m16n8k16, ldmatrix, cp.async, softmax in registers",
           "prefill", "06_flash_mma.cu", "07_tensor_cores", dtypes=(FP16, BF16), returns_lse=True,
           backward="07_flash_bwd.cu", strided_q=True,
           backward_prototype="fastmqa.prototypes.flash_bwd:mqa_flash_bwd",
           prototype="fastmqa.prototypes.flash:mqa_flash_tiled", suites=("prefill",)),
    Kernel("08_flash_wgmma", "Hopper: wgmma from shared-memory descriptors; D = 128 warp-specialised, Q and O by TMA (sm_90a)",
           "prefill", "08_flash_wgmma.cu", "07_tensor_cores", dtypes=(FP16, BF16), returns_lse=True,
           strided_q=True, arch=(9, 0), paths=(2, 12, 13, 14, 15, 16), backward="12_flash_bwd_wgmma.cu",
           backward_prototype="fastmqa.prototypes.flash_bwd:mqa_flash_bwd",
           prototype="fastmqa.prototypes.flash:mqa_flash_tiled", suites=("prefill",)),
    Kernel("09_flash_3xtf32", "fp32 on tensor cores: 3xTF32 split products in the fused kernel",
           "prefill", "09_flash_3xtf32.cu", "07_tensor_cores", returns_lse=True, strided_q=True,
           workspace=_split_kv_bytes,
           prototype="fastmqa.prototypes.tf32:mqa_flash_3xtf32", suites=("fp32",)),
    # --- decode over a KV cache ---------------------------------------------------------
    Kernel("10_decode", "decode: all heads share each K/V tile, split-KV over CTAs + combine", "decode",
           "10_decode.cu", "08_decode", dtypes=(FP16, BF16), head_dims=(64, 128, 192), max_sq=8,
           workspace=_decode_workspace, returns_lse=True, paged=True,
           prototype="fastmqa.prototypes.decode:mqa_decode_splitkv", suites=("decode",)),
    # MLA: D = 576 is the latent cache (512 + 64 RoPE) passed as both k and v (one load per tile);
    # o[..., :512] is MLA's output. Distinct k and v of D = 576 work too.
    Kernel("11_decode_mla", "decode, MLA latent (D=576): output columns split over warps", "decode",
           "11_decode_mla.cu", "08_decode", dtypes=(FP16, BF16), head_dims=(576,), max_sq=8,
           workspace=_decode_workspace, returns_lse=True,
           prototype="fastmqa.prototypes.decode:mqa_decode_splitkv", suites=("decode",)),
]


def get(name: str) -> Kernel:
    for k in REGISTRY:
        if k.name == name:
            return k
    raise KeyError(f"no kernel named {name!r}; known: {', '.join(k.name for k in REGISTRY)}")


def by_kind(kind: str) -> list[Kernel]:
    if kind not in ("prefill", "decode"):
        raise ValueError(f"kind must be 'prefill' or 'decode', got {kind!r}")
    return [k for k in REGISTRY if k.kind == kind]


def in_suite(suite: str) -> list[Kernel]:
    return [k for k in REGISTRY if suite in k.suites]
