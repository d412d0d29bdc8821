"""Compile every numba.cuda prototype kernel for a real GPU (PTX, sm_90) on a machine with none.

numba's simulator runs kernels as Python and accepts code that real numba refuses (e.g. a
cuda.local.array whose size is an expression instead of a literal): chapter 07 once passed
every simulator test and failed on the H100. This check closes that gap in CI:

  1. record: run each registry prototype in the simulator at a tiny shape, recording every
     kernel launch with the numba types of its arguments;
  2. compile: in a fresh process with the simulator off, cuda.compile_ptx each recorded
     (kernel, signature) for compute capability 9.0. No GPU or driver is needed, only NVVM
     (in the CUDA toolkit) and NVRTC (the nvidia-cuda-nvrtc wheel: pass its lib folder in
     LD_LIBRARY_PATH).

    python scripts/ptx_check_prototypes.py        # both phases; exit 1 if a kernel fails
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def record(out_path):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    from fastmqa import sim
    sim.setup("sim", quiet=True)
    import numba
    import numpy as np
    import torch
    from numba.cuda.simulator import kernel as simkernel
    from fastmqa import kernels

    seen = {}
    orig_call = simkernel.FakeCUDAKernel.__call__

    def typ(a):
        a = getattr(a, "_ary", a)  # a simulator device array wraps its numpy array
        if isinstance(a, bool):
            return "boolean"
        if isinstance(a, int):
            return "int64"
        if isinstance(a, float):
            return "float64"
        return str(numba.typeof(a))

    def spy(self, *args):
        if not (self._device or simkernel._kernel_context):
            fn = self.fn
            key = (fn.__module__, fn.__name__, tuple(typ(a) for a in args))
            seen[key] = True
        return orig_call(self, *args)

    simkernel.FakeCUDAKernel.__call__ = spy
    g = torch.Generator().manual_seed(0)
    for k in kernels.REGISTRY:
        fn = k.prototype_fn()
        if fn is None:
            continue
        D = 64  # every prototype takes D = 64 (the MLA entry shares the decode prototype)
        for causal in (False, True):
            if k.kind == "decode":
                q = torch.randn(2, 4, 1, D, generator=g)
                kv = torch.randn(2, 1, 40, D, generator=g)
                fn(q, kv, kv.clone(), causal=causal, cache_seqlens=torch.tensor([40, 7], dtype=torch.int32))
            else:
                q = torch.randn(1, 2, 5, D, generator=g)
                kv = torch.randn(1, 1, 7, D, generator=g)
                fn(q, kv, kv.clone(), causal=causal)
                bwd = k.backward_prototype_fn()
                if bwd is not None:  # the backward's prototype, with a gradient reaching lse
                    from fastmqa.reference import attention_ref
                    out, lse = attention_ref(q, kv, kv, causal=causal, return_lse=True)
                    bwd(torch.randn_like(q), q, kv, kv.clone(), out, lse, torch.randn_like(lse), causal=causal)
    # Prototypes without a registry kernel of their own: the paged decode (fastmqa.paged) and the
    # pipelined loop of 08's warp-specialised kernel.
    from fastmqa import paged
    from fastmqa.prototypes import decode, flash
    qp, kvp = torch.randn(1, 2, 5, 64, generator=g), torch.randn(1, 1, 40, 64, generator=g)
    for causal in (False, True):
        flash.mqa_flash_pipelined(qp, kvp, kvp.clone(), causal=causal)
    q, kv = torch.randn(2, 4, 1, 64, generator=g), torch.randn(2, 1, 40, 64, generator=g)
    lens = torch.tensor([40, 7], dtype=torch.int32)
    kp, vp, table = paged.from_dense(kv, kv.clone(), lens, 16)
    for causal in (False, True):
        decode.mqa_decode_paged(q, kp, vp, table, lens, causal=causal)
    Path(out_path).write_text(json.dumps([list(k[:2]) + [list(k[2])] for k in seen]))
    print(f"recorded {len(seen)} kernel signatures")


def compile_all(in_path):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
    import importlib
    from fastmqa import sim
    sim._MODE = "gpu"  # compile only: no launch, so no GPU is needed
    from numba import cuda, types  # noqa: F401
    import numba.cuda.dispatcher as _dispatcher

    class _Hopper:  # device functions ask the current device for its compute capability
        compute_capability = (9, 0)
    _dispatcher.get_current_device = lambda: _Hopper()
    bad = 0
    for module, name, argtypes in json.loads(Path(in_path).read_text()):
        disp = getattr(importlib.import_module(module), name)
        sig = tuple(eval(t, vars(types)) if not t.startswith("array(") else _array(t) for t in argtypes)
        try:
            ptx, _ = cuda.compile_ptx(disp.py_func, sig, cc=(9, 0))
            print(f"ok   {module}.{name}{tuple(argtypes)}: {len(ptx)} chars of PTX")
        except Exception as e:
            bad += 1
            print(f"FAIL {module}.{name}{tuple(argtypes)}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    return bad


def _array(t):
    # "array(float32, 4d, C)" -> types.Array(float32, 4, "C")
    from numba import types
    dtype, nd, layout = [s.strip() for s in t[len("array("):-1].split(",")[:3]]
    return types.Array(getattr(types, dtype), int(nd.rstrip("d")), layout)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--record":
        record(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "--compile":
        sys.exit(1 if compile_all(sys.argv[2]) else 0)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            sigs = os.path.join(tmp, "sigs.json")
            subprocess.run([sys.executable, __file__, "--record", sigs], check=True)
            sys.exit(subprocess.run([sys.executable, __file__, "--compile", sigs]).returncode)
