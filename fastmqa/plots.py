"""Plots and tables the book draws, from results/*.json and the memory model only."""
from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from . import bench, memory


def rows(data, **where):
    """Rows of a results dict matching every key=value in `where`."""
    return [r for r in data["rows"] if all(r.get(k) == v for k, v in where.items())]


def seed_rows(data):
    """Rows at the original project's fp32 shape (B=4, H=32, S=512, D=128, non-causal)."""
    s = bench.SEED_SHAPE
    return [r for r in rows(data, B=s["B"], H=s["H"], Sq=s["S"], Skv=s["S"], D=s["D"], causal=False)
            if not r.get("sweep")]


def progression_table(data, previous=None):
    """Markdown-ready list of (impl, ms, TFLOP/s, x vs previous ours, x vs best torch, L4 ms)."""
    rs = seed_rows(data)
    torch_rows = [r for r in rs if r["impl"].startswith("torch.")]
    best_torch = min(torch_rows, key=lambda r: r["ms"]) if torch_rows else None
    out, prev = [], None
    for r in sorted([r for r in rs if not r["impl"].startswith("torch.")], key=lambda r: r["impl"]):
        out.append(dict(impl=r["impl"], ms=r["ms"], tflops=r["tflops"],
                        vs_previous=(prev["ms"] / r["ms"]) if prev else None,
                        vs_best_torch=(best_torch["ms"] / r["ms"]) if best_torch else None,
                        l4_ms=bench.L4_REFERENCE_MS.get(r["impl"])))
        prev = r
    for r in sorted(torch_rows, key=lambda r: r["ms"]):
        out.append(dict(impl=r["impl"], ms=r["ms"], tflops=r["tflops"], vs_previous=None,
                        vs_best_torch=best_torch["ms"] / r["ms"], l4_ms=None))
    return out, best_torch


def print_table(table, cols, fmt=None):
    fmt = fmt or {}
    widths = {c: max(len(c), *(len(_f(t.get(c), fmt.get(c))) for t in table)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for t in table:
        print("  ".join(_f(t.get(c), fmt.get(c)).ljust(widths[c]) for c in cols))


def _f(v, f=None):
    if v is None:
        return "-"
    if f:
        return format(v, f)
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def progression_chart(data, ax=None):
    """Bar chart (log scale) of every fp32 kernel and PyTorch path at the seed shape."""
    table, best = progression_table(data)
    ax = ax or plt.subplots(figsize=(8, 3.6))[1]
    names = [t["impl"] for t in table]
    ms = [t["ms"] for t in table]
    colors = ["#1f77b4" if not n.startswith("torch.") else "#7f7f7f" for n in names]
    ax.barh(names[::-1], ms[::-1], color=colors[::-1])
    ax.set_xscale("log")
    ax.set_xlabel("ms (log scale), lower is better")
    ax.set_title(f"fp32 MQA, B=4 H=32 S=512 D=128 on {data['device']}")
    for y, v in enumerate(ms[::-1]):
        ax.text(v, y, f" {v:.3g} ms", va="center", fontsize=8)
    return ax


def memory_plot(num_heads=32, head_dim=128, layers=32, dtype=torch.bfloat16, ax=None, groups=8,
                kv_lora_rank=512, rope_dim=64, max_len=32768):
    """KV-cache size per sequence vs length for MHA, GQA, MQA and MLA (one model of `layers`)."""
    specs = [memory.mha(num_heads, head_dim), memory.gqa(num_heads, head_dim, groups),
             memory.mqa(num_heads, head_dim), memory.mla(num_heads, head_dim, kv_lora_rank, rope_dim)]
    lens = [2**i for i in range(7, max_len.bit_length())]
    ax = ax or plt.subplots(figsize=(7, 3.6))[1]
    for s in specs:
        ax.plot(lens, [memory.cache_bytes(s, 1, n, dtype, layers) / 2**30 for n in lens], marker="o", label=s.name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("KV cache per sequence (GiB)")
    ax.set_title(f"{layers} layers, H={num_heads}, D={head_dim}, {str(dtype).replace('torch.', '')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return ax
