"""Build `kernels/*.cu` into torch extensions with `torch.utils.cpp_extension.load_inline`.

A kernel file holds device code and a launcher `int fastmqa_<name>(const MQAParams&)`; it
includes no torch header, so nvcc compiles it quickly. The torch side (tensors in,
pointers out) is one small binding generated here, the same for every kernel. Every
extension is cached in one `TORCH_EXTENSIONS_DIR` (default `.torch_extensions/` in the repo)
and independent kernels are built in parallel threads.
"""
from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS_DIR = ROOT / "kernels"

_BINDING = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include "mqa_params.cuh"

int fastmqa_{fn}(const MQAParams& p);

static int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return FASTMQA_FP32;
    case at::kHalf: return FASTMQA_FP16;
    case at::kBFloat16: return FASTMQA_BF16;
    default: TORCH_CHECK(false, "q has dtype ", t.scalar_type(), ", expected float32, float16 or bfloat16");
  }
  return -1;
}

// What the forward bindings (dense and paged) fill alike: q, o (and their strides), lse, seqlens, the workspace,
// scale, causal, the split count and the device; k, v and Skv are the caller's.
static MQAParams attention_params(const at::Tensor& q, const at::Tensor& o, const at::Tensor& lse,
                                  const at::Tensor& seqlens, const at::Tensor& workspace, double scale,
                                  bool causal, int64_t num_splits) {
  MQAParams p{};
  p.q = q.data_ptr(); p.o = o.data_ptr();
  p.lse = lse.numel() ? lse.data_ptr<float>() : nullptr;
  p.seqlens = seqlens.numel() ? seqlens.data_ptr<int>() : nullptr;
  p.workspace = workspace.numel() ? workspace.data_ptr() : nullptr;
  p.workspace_bytes = workspace.numel();
  p.B = q.size(0); p.H = q.size(1); p.Sq = q.size(2); p.D = q.size(3);
  p.scale = (float)scale; p.causal = causal; p.dtype = dtype_code(q);
  p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_ss = q.stride(2);
  p.o_sb = o.stride(0); p.o_sh = o.stride(1); p.o_ss = o.stride(2);
  p.num_splits = (int)num_splits;
  p.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  p.stream = at::cuda::getCurrentCUDAStream();
  return p;
}

// q (B, H, Sq, D); k, v (B, Skv, D); o like q; lse (B, H, Sq) float32 or empty;
// seqlens (B,) int32 or empty; workspace uint8 or empty. Python validated the shapes.
void run(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor o, at::Tensor lse,
         at::Tensor seqlens, at::Tensor workspace, double scale, bool causal, int64_t num_splits) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda() && o.is_cuda(), "q, k, v, o must be CUDA tensors");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "k, v must be contiguous");
  TORCH_CHECK({strided} ? (q.stride(-1) == 1 && o.stride(-1) == 1) : (q.is_contiguous() && o.is_contiguous()),
              {strided} ? "q, o must have unit stride in the head dim" : "q, o must be contiguous");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 3 && v.dim() == 3, "q must be 4-D and k, v 3-D");
  const c10::cuda::CUDAGuard guard(q.device());
  MQAParams p = attention_params(q, o, lse, seqlens, workspace, scale, causal, num_splits);
  p.k = k.data_ptr(); p.v = v.data_ptr(); p.Skv = k.size(1);
  {blas}
  int status = fastmqa_{fn}(p);
  TORCH_CHECK(status == 0, "kernel {fn} does not support this configuration (B=", p.B, " H=", p.H,
              " Sq=", p.Sq, " Skv=", p.Skv, " D=", p.D, " dtype code ", p.dtype, ")");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
{paged}"""

# Decode kernels with a paged cache (registry paged=True) also get `run_paged`: k_pages, v_pages
# (num_pages, page_size, D) and block_table (B, max_pages) int32 in place of k, v; seqlens required.
# Python validated the table (fastmqa.paged.check_paged).
_BINDING_PAGED = r"""
void run_paged(at::Tensor q, at::Tensor k_pages, at::Tensor v_pages, at::Tensor o, at::Tensor lse,
               at::Tensor block_table, at::Tensor seqlens, at::Tensor workspace, double scale, bool causal,
               int64_t num_splits) {
  TORCH_CHECK(q.is_cuda() && k_pages.is_cuda() && v_pages.is_cuda() && o.is_cuda() && block_table.is_cuda() && seqlens.is_cuda(),
              "q, k_pages, v_pages, o, block_table, seqlens must be CUDA tensors");
  TORCH_CHECK(q.is_contiguous() && o.is_contiguous() && k_pages.is_contiguous() && v_pages.is_contiguous(),
              "q, o, k_pages, v_pages must be contiguous");
  TORCH_CHECK(q.dim() == 4 && k_pages.dim() == 3 && k_pages.sizes() == v_pages.sizes(),
              "q must be 4-D, k_pages and v_pages (num_pages, page_size, D)");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == q.size(0) && block_table.is_contiguous() &&
              block_table.scalar_type() == at::kInt, "block_table must be a contiguous (B, max_pages) int32 tensor");
  TORCH_CHECK(seqlens.numel() == q.size(0) && seqlens.scalar_type() == at::kInt, "a paged cache needs seqlens (B,) int32");
  const c10::cuda::CUDAGuard guard(q.device());
  MQAParams p = attention_params(q, o, lse, seqlens, workspace, scale, causal, num_splits);
  p.k = k_pages.data_ptr(); p.v = v_pages.data_ptr();
  p.block_table = block_table.data_ptr<int>();
  p.max_pages = block_table.size(1); p.page_size = k_pages.size(1); p.Skv = p.max_pages * p.page_size;
  int status = fastmqa_{fn}(p);
  TORCH_CHECK(status == 0, "kernel {fn} does not support this paged cache (page_size=", p.page_size,
              ", max_pages=", p.max_pages, ", D=", p.D, ", dtype code ", p.dtype, ")");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
"""

# The backward kernels' binding: the forward's q, k, v, out, lse and the upstream gradients in,
# dq, dk, dv out (preallocated by fastmqa.kernels.Kernel.prepare_backward).
_BINDING_BWD = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include "mqa_params.cuh"

int fastmqa_{fn}(const MQAParams& p);

void run_bwd(at::Tensor dout, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor out, at::Tensor lse,
             at::Tensor dlse, at::Tensor dq, at::Tensor dk, at::Tensor dv, at::Tensor workspace,
             double scale, bool causal) {
  for (const at::Tensor* t : {&dout, &q, &k, &v, &out, &dq, &dk, &dv})
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == q.scalar_type(), "dout, q, k, v, out, dq, dk, dv must be CUDA tensors of q's dtype");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && dk.is_contiguous() && dv.is_contiguous(),
              "k, v, dk, dv must be contiguous");
  TORCH_CHECK(q.stride(-1) == 1 && out.stride(-1) == 1 && dout.strides() == out.strides() && dq.strides() == out.strides(),
              "dout and dq must have out's strides; q and out unit stride in the head dim");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat, "lse must be contiguous float32");
  TORCH_CHECK(!dlse.numel() || (dlse.is_contiguous() && dlse.scalar_type() == at::kFloat),
              "dlse must be empty or contiguous float32");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "q must be float16 or bfloat16");
  const c10::cuda::CUDAGuard guard(q.device());
  MQAParams p{};
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr(); p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.dout = dout.data_ptr(); p.dlse = dlse.numel() ? dlse.data_ptr<float>() : nullptr;
  p.dq = dq.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
  p.workspace = workspace.numel() ? workspace.data_ptr() : nullptr;
  p.workspace_bytes = workspace.numel();
  p.B = q.size(0); p.H = q.size(1); p.Sq = q.size(2); p.D = q.size(3); p.Skv = k.size(1);
  p.scale = (float)scale; p.causal = causal;
  p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_ss = q.stride(2);
  p.o_sb = out.stride(0); p.o_sh = out.stride(1); p.o_ss = out.stride(2);
  p.dtype = q.scalar_type() == at::kHalf ? FASTMQA_FP16 : FASTMQA_BF16;
  p.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  p.stream = at::cuda::getCurrentCUDAStream();
  int status = fastmqa_{fn}(p);
  TORCH_CHECK(status == 0, "kernel {fn} does not support this configuration (B=", p.B, " H=", p.H,
              " Sq=", p.Sq, " Skv=", p.Skv, " D=", p.D, " dtype code ", p.dtype, ")");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
"""

_BLAS = "p.blas_handle = (void*)at::cuda::getCurrentCUDABlasHandle();"

_lock = threading.Lock()
_loaded: dict[str, object] = {}


class BuildError(RuntimeError):
    pass


def extensions_dir() -> Path:
    d = Path(os.environ.get("TORCH_EXTENSIONS_DIR", ROOT / ".torch_extensions"))
    os.environ["TORCH_EXTENSIONS_DIR"] = str(d)
    d.mkdir(parents=True, exist_ok=True)
    return d


def require_toolchain():
    """Raise BuildError naming what is missing to build CUDA kernels."""
    import torch
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False"
                       + ("; this torch is a CPU build" if torch.version.cuda is None else "") + ")")
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    if not Path(nvcc).exists():
        missing.append("nvcc (the CUDA compiler; set CUDA_HOME or put nvcc on PATH)")
    if missing:
        raise BuildError("cannot build the CUDA kernels: missing " + " and ".join(missing)
                         + ". On a CPU-only machine run the numba prototypes in the simulator instead "
                         "(fastmqa.sim).")


def arch_flags() -> list[str]:
    import torch
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) == (9, 0):
        # sm_90a enables Hopper-only instructions (wgmma, setmaxnreg).
        return ["-gencode=arch=compute_90a,code=sm_90a"]
    return [f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"]


def cuda_flags() -> list[str]:
    # No --use_fast_math: the fp32 chapters compare against an fp64 reference and expf's
    # accuracy is part of the lesson; kernels that want __expf/exp2f ask for it explicitly.
    return ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__", *arch_flags()]


def binding_source(fn: str, uses_cublas: bool = False, backward: bool = False, strided: bool = False,
                   paged: bool = False) -> str:
    """The C++ torch binding `load` compiles for launcher `fastmqa_<fn>` (scripts/compile_kernels.sh
    compile-checks it in CI): `run` for a forward kernel (and `run_paged` for a decode kernel that
    reads a paged cache), `run_bwd` for a backward kernel."""
    src = _BINDING_BWD if backward else _BINDING.replace("{paged}", _BINDING_PAGED if paged else "")
    return (src.replace("{fn}", fn).replace("{blas}", _BLAS if uses_cublas else "")
            .replace("{strided}", "true" if strided else "false"))


def load(name: str, source: str, uses_cublas: bool = False, verbose: bool = False, defines=(), symbol=None,
         backward: bool = False, strided: bool = False, paged: bool = False):
    """Build (or load from the cache) the extension for kernel `name` from kernels/`source`.

    defines: extra `-D` macros (a kernel's dev knobs); symbol: the launcher the source defines
    (`fastmqa_<symbol>`), when `name` is a variant's name rather than the kernel's own;
    backward: a backward kernel, bound as `run_bwd` (gradients) instead of `run`; strided: the
    kernel reads q's and o's strides (MQAParams.q_sb ...), so the binding accepts views; paged: also
    bind `run_paged` (a decode kernel reading a paged cache through MQAParams.block_table)."""
    with _lock:
        if name in _loaded:
            return _loaded[name]
    require_toolchain()
    from torch.utils.cpp_extension import load_inline
    fn = symbol or name_to_symbol(name)
    cu = (KERNELS_DIR / source).read_text()
    cpp = binding_source(fn, uses_cublas, backward, strided, paged)
    extensions_dir()
    os.environ.setdefault("MAX_JOBS", "2")
    try:
        mod = load_inline(
            name=f"fastmqa_{name_to_symbol(name)}", cpp_sources=[cpp], cuda_sources=[cu],
            functions=["run_bwd"] if backward else ["run", "run_paged"] if paged else ["run"],
            extra_cuda_cflags=cuda_flags() + [f"-D{d}" for d in defines], extra_cflags=["-O3"],
            extra_include_paths=[str(KERNELS_DIR)],
            extra_ldflags=["-lcublas"] if uses_cublas else [], verbose=verbose)
    except Exception as e:  # keep the compiler's message, name the kernel
        raise BuildError(f"building kernel {name} from kernels/{source} failed: {e}") from e
    with _lock:
        _loaded[name] = mod
    return mod


def load_variant(kernel, tag: str, defines):
    """Registry entry `kernel` built with `-D` macros `defines`, as its own extension; returns a copy
    of the entry named '<name>_<tag>' that runs it (dev scripts time a kernel's knobs side by side)."""
    import dataclasses
    name = f"{kernel.name}_{tag}"
    load(name, kernel.source, kernel.uses_cublas, defines=defines, symbol=name_to_symbol(kernel.name),
         strided=kernel.strided_q, paged=kernel.paged)
    return dataclasses.replace(kernel, name=name)


def name_to_symbol(name: str) -> str:
    """'01_naive' -> 'naive_01' would be confusing; keep the registry name, made an identifier."""
    return "k" + name.replace("-", "_")


def backward_name(entry) -> str:
    """The extension name of a registry entry's backward kernel: its file's stem ('07_flash_bwd')."""
    return Path(entry.backward).stem


def build_all(entries, max_workers: int | None = None, verbose: bool = False) -> dict:
    """Build registry entries in parallel; returns {name: None or the exception}."""
    require_toolchain()
    jobs = [(e.name, e.source, e.uses_cublas, False, getattr(e, "strided_q", False), getattr(e, "paged", False))
            for e in entries if e.source]
    jobs += [(backward_name(e), e.backward, False, True, False, False) for e in entries if getattr(e, "backward", None)]
    max_workers = max_workers or min(len(jobs), max(1, (os.cpu_count() or 2) // 2)) or 1
    results = {}

    def one(job):
        name, source, uses_cublas, backward, strided, paged = job
        try:
            load(name, source, uses_cublas, verbose, backward=backward, strided=strided, paged=paged)
            return name, None
        except Exception as ex:  # reported per kernel
            return name, ex

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        for name, err in pool.map(one, jobs):
            results[name] = err
    return results
