"""The `layer` benchmark suite: whole attention layers, as a model uses them (bf16, H100).

Two workloads, both at hidden 4096 and 32 query heads (head_dim 128):

* prefill layer rows (kind "layer"): one causal layer over B x S tokens (B * S = 16384),
  S = 512 ... 8192, "pass" = "fwd" (inference mode) or "fwd+bwd" (training step: forward,
  then backward of a random upstream gradient into the input and the weights), for
      fastmqa.layer          FastMQALayer: mqa_attention (a registry kernel) + its FA-2 backward
      torch.mha              nn.MultiheadAttention (MHA, 32 K/V heads)
      torch.sdpa_gqa_layer   the same MQA layer with PyTorch's SDPA (enable_gqa) for attention
  tflops counts the layer's model flops (projections + attention, halved for causal); the
  backward counts as twice the forward. At each shape and pass the three layers are timed side
  by side in the same repetitions (paired, order rotating); ms is each layer's median, and
  fastmqa.layer's rows carry x_mha and x_sdpa_gqa_layer: the median [and quartiles] of the other
  layer's time over ours per repetition (> 1: ours is faster).

* decode rows (kind "decode"): one new token per sequence against a cache of 4096 or 32768
  tokens (DECODE_CONTEXTS), B = 1 ... 64, for MHA, GQA-8, MQA (torch.sdpa_gqa_layer), MQA (fastmqa.layer) and MLA
  (fastmqa.mla, absorbed: attention over the latent cache; "MLA": latent = head_dim + 64 RoPE,
  "MLA-512": DeepSeek-V2's 512 + 64). gbps is the cache bytes read per
  step / time; tokens_per_s = B / time. "path" says which attention ran (a registry decode
  kernel, "mqa_attention:<prefill kernel or reference>", "sdpa" or "reference"). A step is
  timed on the GPU with its launches queued ahead (`Timer(lead=True)`: the time a CUDA graph of
  the step would take; a step's Python side takes longer than its kernels at small B), after
  DECODE_WARMUP steps.

`suite_layer(timer, quick=False)` returns (rows, skipped); `fastmqa.bench` writes them.
"""
from __future__ import annotations

import statistics

import torch
from torch import nn

from . import ops
from .bench import _progress, _row, attention_flops
from .generate import KVCache
from .layers import FastMQALayer, GQALayer
from .mla import MultiHeadLatentAttention

HIDDEN, HEADS, DTYPE = 4096, 32, torch.bfloat16
TOKENS = 16384                       # B * S of the prefill rows
DECODE_CONTEXTS = (4096, 32768)     # cache lengths of the decode rows (quick: the first)
DECODE_WARMUP = 20                   # decode steps before timing (first calls pick kernels, allocate)
DEVICE = "cuda"                      # a test runs the suite's plumbing on the CPU at tiny sizes


def _prefill_layers():
    """{impl: (module factory, fn(module, x) -> out, K/V heads)}."""
    masks = {}

    def mha_fn(m, x):
        # nn.MultiheadAttention wants the mask with is_causal=True (a hint it then passes to SDPA);
        # built once per shape, outside the timed call
        key = (x.shape[1], x.device, x.dtype)
        if key not in masks:
            masks[key] = torch.full(key[:1] * 2, float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        return m(x, x, x, need_weights=False, attn_mask=masks[key], is_causal=True)[0]
    layer_fn = lambda m, x: m(x)
    return {
        "fastmqa.layer": (lambda: FastMQALayer(HIDDEN, HEADS, causal=True), layer_fn, 1),
        "torch.mha": (lambda: nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True), mha_fn, HEADS),
        "torch.sdpa_gqa_layer": (lambda: GQALayer(HIDDEN, HEADS, 1, causal=True), layer_fn, 1),
    }


def layer_flops(B, S, kv_heads, causal=True):
    """Forward model flops of one attention layer: q, k, v, o projections + attention."""
    D = HIDDEN // HEADS
    proj = 2 * B * S * HIDDEN * (2 * HIDDEN + 2 * kv_heads * D)
    return proj + attention_flops(B, HEADS, S, S, D, causal)


def _prefill_rows(timer, seqs, bar):
    """Every layer at one shape and pass, side by side: each repetition times the three layers
    moments apart (`Timer.side_by_side`, order rotating), so clock and thermal drift over the
    suite, which moved a layer's time by up to 10 % from one round to the next when they were
    timed one after another, cancels in the paired ratios. ms is each layer's median;
    fastmqa.layer's rows also carry x_<impl> = median and quartiles of that layer's time over
    ours, per repetition (> 1: ours is faster)."""
    from .bench import paired_ratio
    rows, skipped = [], []
    D = HIDDEN // HEADS
    kern = ops.select_kernel(DTYPE, D, True)
    layers = {impl: (make().to(device=DEVICE, dtype=DTYPE), fn, kv_heads)
              for impl, (make, fn, kv_heads) in _prefill_layers().items()}
    for S in seqs:
        B = max(1, TOKENS // S)
        x = torch.randn(B, S, HIDDEN, device=DEVICE, dtype=DTYPE)
        g = torch.randn_like(x)
        xg = x.clone().requires_grad_()
        for name, mult in (("fwd", 1), ("fwd+bwd", 3)):
            fns, failed = {}, {}
            for impl, (module, fn, _) in layers.items():
                module.train(name == "fwd+bwd")

                def run(module=module, fn=fn):
                    if name == "fwd":
                        with torch.inference_mode():
                            fn(module, x)
                    else:  # gradients set to None, not accumulated: no add kernel in the timing
                        xg.grad = None
                        module.zero_grad(set_to_none=True)
                        fn(module, xg).backward(g)
                try:  # one call alone first: a layer that does not fit is left out, not the shape
                    run()
                    if x.is_cuda:
                        torch.cuda.synchronize()
                    fns[impl] = run
                except torch.OutOfMemoryError as e:
                    failed[impl] = f"out of memory: {str(e).splitlines()[0][:120]}"
                    module.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
            times = timer.side_by_side(fns) if fns else {}
            for impl, (_, _, kv_heads) in layers.items():
                if impl in failed:
                    skipped.append(dict(impl=impl, S=S, **{"pass": name}, why=failed[impl]))
                    continue
                ms = statistics.median(times[impl])
                extra = dict(hidden=HIDDEN, kv_heads=kv_heads, reps=len(times[impl]))
                if impl == "fastmqa.layer":
                    extra["path"] = kern.name if kern is not None else "reference"
                    for other in times:
                        if other != impl:
                            pr = paired_ratio(times[other], times[impl])
                            extra["x_" + other.split(".", 1)[1]] = [round(pr[k], 4) for k in ("median", "q1", "q3")]
                flops = mult * layer_flops(B, S, kv_heads)
                rows.append(_row(impl, "layer", DTYPE, B, HEADS, S, S, D, True, ms, **{"pass": name},
                                 tflops=round(flops / ms / 1e9, 2), **extra))
        del x, g, xg
        bar.update(len(layers))
    del layers
    torch.cuda.empty_cache()
    return rows, skipped


# (attention, impl, layer factory) for the decode rows; layers are built one at a time.
DECODE_LAYERS = [
    ("MHA", "torch.sdpa_gqa_layer", lambda: GQALayer(HIDDEN, HEADS, HEADS, causal=True)),
    ("GQA-8", "torch.sdpa_gqa_layer", lambda: GQALayer(HIDDEN, HEADS, 8, causal=True)),
    ("MQA", "torch.sdpa_gqa_layer", lambda: GQALayer(HIDDEN, HEADS, 1, causal=True)),
    ("MQA", "fastmqa.layer", lambda: FastMQALayer(HIDDEN, HEADS, causal=True)),
    # MLA with the latent = head_dim (mla_compression 0.5), and with DeepSeek-V2's 512 + 64 row
    ("MLA", "fastmqa.mla", lambda: MultiHeadLatentAttention(HIDDEN, HEADS, rope_dim=64, causal=True)),
    ("MLA-512", "fastmqa.mla", lambda: MultiHeadLatentAttention(HIDDEN, HEADS, kv_lora_rank=512, rope_dim=64,
                                                                 causal=True)),
]


def _decode_rows(timer, batches, contexts, bar):
    rows, skipped = [], []
    D = HIDDEN // HEADS
    for attention, impl, make in DECODE_LAYERS:
        layer = make().to(device=DEVICE, dtype=DTYPE).eval()
        for S, B in ((S, B) for S in contexts for B in batches):
            try:
                cache = KVCache.for_layer(layer, batch=B, max_seq_len=S)
            except torch.OutOfMemoryError as e:
                skipped.append(dict(impl=impl, attention=attention, B=B, S=S, why=f"cache out of memory: {e}"))
                bar.update()
                continue
            for t in cache.k + cache.v:
                if t is not None:
                    t.normal_()
            cache.step(S - 1)
            cache.step(1)            # the timed step writes position S-1 and attends over S keys
            slot = cache.layer(0)
            x = torch.randn(B, 1, HIDDEN, device=DEVICE, dtype=DTYPE)

            def step():
                with torch.inference_mode():
                    layer(x, kv_cache=slot)
            ms = timer(step, lead=True, warmup=DECODE_WARMUP)
            nbytes = cache.nbytes()
            rows.append(_row(impl, "decode", DTYPE, B, HEADS, 1, S, D, True, ms, attention=attention,
                             gbps=round(nbytes / ms / 1e6, 1), tokens_per_s=round(B / ms * 1e3, 1),
                             cache_bytes=nbytes, bytes_per_token=nbytes // (B * S), path=slot.last_path,
                             hidden=HIDDEN))
            del cache, slot, x
            torch.cuda.empty_cache()
            bar.update()
        del layer
    return rows, skipped


def suite_layer(timer, quick=False):
    """Rows of the `layer` suite (see the module docstring). Needs a CUDA GPU."""
    seqs = [512, 2048] if quick else [512, 1024, 2048, 4096, 8192]
    batches = [1, 16] if quick else [1, 4, 16, 64]
    contexts = DECODE_CONTEXTS[:1] if quick else DECODE_CONTEXTS
    bar = _progress(3 * len(seqs) + len(DECODE_LAYERS) * len(batches) * len(contexts), "layer")
    rows, skipped = _prefill_rows(timer, seqs, bar)
    r2, s2 = _decode_rows(timer, batches, contexts, bar)
    bar.close()
    return rows + r2, skipped + s2
