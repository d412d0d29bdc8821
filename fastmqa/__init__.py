"""FastMQA: Multi-Query Attention kernels, from a naive CUDA kernel to tensor cores.

The package holds the plumbing of the course: the float64 reference (`reference`),
the tolerance rule (`check`), the KV-cache memory model (`memory`), the kernel build
(`build`), the one registry of kernels (`kernels`), benchmarks (`bench`), the numba
simulator switch (`sim`) and the GPU check (`gpucheck`).
"""
__version__ = "0.1.0"

from .reference import mqa_attention_ref, gqa_attention_ref, mha_attention_ref  # noqa: F401


def __getattr__(name):
    # Layers and ops import lazily so `import fastmqa` stays light.
    if name in ("FastMQALayer", "ProductionFastMQA"):
        from . import layers
        return getattr(layers, name)
    if name in ("mqa_attention", "forward"):
        from . import ops
        return getattr(ops, name)
    raise AttributeError(f"module 'fastmqa' has no attribute {name!r}")
