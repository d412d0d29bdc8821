"""fastmqa.layers: FastMQALayer, GQALayer, ProductionFastMQA."""
import copy
import io

import pytest
import torch
from torch import nn

from fastmqa import check, memory
from fastmqa.layers import FastMQALayer, GQALayer, ProductionFastMQA, pool_kv_heads

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def within_rule(out, torch_out, ref, dtype, what):
    """The project's rule (fastmqa.check) applied to a layer: our error vs the fp64 layer is at
    most MULTIPLE x the error of PyTorch's own computation in the same dtype, + floor."""
    ref = ref.double().cpu()  # the fp64 layer may have run on the GPU
    err = float((out.double().cpu() - ref).abs().max())
    terr = float((torch_out.double().cpu() - ref).abs().max())
    tol = check.MULTIPLE * terr + check.ATOL[dtype] * max(1.0, float(ref.abs().max()))
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    assert err <= tol, f"{what}: err {err:.3e} > tol {tol:.3e} (torch err {terr:.3e})"


def tied_mha(E=64, H=4, seed=0, bias=True):
    """An nn.MultiheadAttention whose H K heads are one head repeated (and V likewise)."""
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, batch_first=True, bias=bias)
    D = E // H
    with torch.no_grad():
        w = mha.in_proj_weight
        w[E:2 * E] = w[E:E + D].repeat(H, 1)
        w[2 * E:] = w[2 * E:2 * E + D].repeat(H, 1)
        if bias:
            b = mha.in_proj_bias
            b.normal_()
            b[E:2 * E] = b[E:E + D].repeat(H)
            b[2 * E:] = b[2 * E:2 * E + D].repeat(H)
    return mha.eval()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_multihead_attention_with_tied_kv(causal, bias):
    mha = tied_mha(bias=bias)
    layer = FastMQALayer.from_mha(mha, causal=causal).eval()
    x = torch.randn(3, 11, 64)
    mask = nn.Transformer.generate_square_subsequent_mask(11) if causal else None

    def run_mha(m, x):
        return m(x, x, x, need_weights=False, attn_mask=None if mask is None else mask.to(x.dtype),
                 is_causal=causal)[0]
    ref = run_mha(copy.deepcopy(mha).double(), x.double())
    with torch.no_grad():
        within_rule(layer(x), run_mha(mha, x), ref, torch.float32, f"FastMQALayer vs MHA causal={causal}")


def test_from_mha_pools_heads():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    E, D = 32, 8
    mean = FastMQALayer.from_mha(mha)
    first = FastMQALayer.from_mha(mha, kv_init="first")
    wk = mha.in_proj_weight[E:2 * E].detach()
    assert torch.allclose(mean.k_proj.weight, wk.view(4, D, E).mean(0))
    assert torch.equal(first.k_proj.weight, wk[:D])
    assert torch.allclose(mean.v_proj.bias, mha.in_proj_bias[2 * E:].detach().view(4, D).mean(0))
    assert torch.equal(mean.q_proj.weight, mha.in_proj_weight[:E].detach())
    assert torch.equal(mean.out_proj.weight, mha.out_proj.weight.detach())
    g2 = GQALayer.from_mha(mha, kv_heads=2)
    assert torch.allclose(g2.k_proj.weight, wk.view(2, 2, D, E).mean(1).reshape(2 * D, E))
    # from a dict of weights (e.g. a Hugging Face checkpoint's q/k/v/o projections)
    w = dict(num_heads=4, q_weight=mean.q_proj.weight, k_weight=wk, v_weight=mha.in_proj_weight[2 * E:],
             o_weight=mha.out_proj.weight)
    assert FastMQALayer.from_mha(w).q_proj.bias is None
    with pytest.raises(ValueError, match="missing o_weight"):
        FastMQALayer.from_mha({k: v for k, v in w.items() if k != "o_weight"})
    with pytest.raises(ValueError, match="kv_init must be 'mean' or 'first'"):
        pool_kv_heads(wk, 4, 1, "max")


def test_gqa_layer_with_all_heads_is_mha():
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    layer = GQALayer.from_mha(mha, kv_heads=4).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        assert torch.allclose(layer(x), mha(x, x, x, need_weights=False)[0], atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_and_reference_paths_agree(causal):
    torch.manual_seed(1)
    layer = FastMQALayer(64, 4, causal=causal)
    ref = copy.deepcopy(layer)
    ref.use_flash = False
    x = torch.randn(2, 13, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = layer(x), ref(x2)
    assert torch.allclose(y, y2, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g), y2.backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    for (n, p), p2 in zip(layer.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, p2.grad, atol=1e-4), n


@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_layer_stability(scale):
    torch.manual_seed(2)
    layer = FastMQALayer(64, 4, causal=True).eval()
    ref = copy.deepcopy(layer)
    ref.use_flash = False
    x = torch.randn(2, 16, 64) * scale
    with torch.no_grad():
        truth = copy.deepcopy(layer).double()(x.double())
        within_rule(layer(x), ref(x), truth, torch.float32, f"layer x{scale:g}")


def test_autocast_bf16():
    torch.manual_seed(3)
    layer = FastMQALayer(64, 4, causal=True)
    ref = copy.deepcopy(layer)
    ref.use_flash = False
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        truth = copy.deepcopy(layer).double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, y_ref = layer(x), ref(x)
    assert y.dtype == torch.bfloat16
    within_rule(y, y_ref, truth, torch.bfloat16, "layer under bf16 autocast")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x.requires_grad_()).float().sum().backward()
    assert torch.isfinite(x.grad).all() and layer.q_proj.weight.grad is not None


def test_zero_upstream_grad_gives_zero_grads():
    layer = FastMQALayer(32, 4, causal=True)
    x = torch.randn(2, 5, 32, requires_grad=True)
    layer(x).backward(torch.zeros(2, 5, 32))
    assert torch.count_nonzero(x.grad) == 0
    assert all(torch.count_nonzero(p.grad) == 0 for p in layer.parameters())


def test_compile_fullgraph_equals_eager():
    torch.manual_seed(4)
    layer = FastMQALayer(32, 4, causal=True)
    compiled = torch.compile(layer, fullgraph=True)      # inductor; no graph break allowed
    x = torch.randn(2, 8, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = compiled(x), layer(x2)
    assert torch.allclose(y, y2, atol=1e-5)
    y.sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    y2.sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert all(torch.allclose(a, p.grad, atol=1e-4) for a, p in zip(grads, layer.parameters()))


@pytest.mark.parametrize("make", [lambda: FastMQALayer(32, 4, causal=True),
                                  lambda: ProductionFastMQA(32, 4, enable_mla=True, rope_dim=4)])
def test_state_dict_round_trip(make):
    torch.manual_seed(5)
    a = make()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make()
    b.load_state_dict(torch.load(buf))
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_dropout_only_in_training():
    layer = FastMQALayer(32, 4, dropout=0.5)
    x = torch.randn(2, 8, 32)
    torch.manual_seed(0)
    a = layer(x)
    b = layer(x)
    assert not torch.allclose(a, b)
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="hidden_dim must be divisible by num_heads"):
        FastMQALayer(30, 4)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        FastMQALayer(32, 0)
    with pytest.raises(ValueError, match=r"x must be \(B, S, 32\)"):
        FastMQALayer(32, 4)(torch.randn(2, 8, 16))
    with pytest.raises(ValueError, match="kv_heads must be a positive int dividing num_heads=4"):
        GQALayer(32, 4, 3)
    with pytest.raises(ValueError, match="dropout must be in"):
        FastMQALayer(32, 4, dropout=1.5)


# -- ProductionFastMQA: statistics from the real cache tensors --------------------------
def test_production_mqa_stats():
    model = ProductionFastMQA(256, 16)
    x = torch.randn(2, 10, 256)
    out, stats = model(x, return_cache_stats=True)
    assert out.shape == x.shape
    assert stats["cache_shapes"] == [(2, 10, 16), (2, 10, 16)]           # k and v of one head
    assert stats["cache_bytes"] == 2 * 2 * 10 * 16 * 4
    assert stats["reduction_percent"] == pytest.approx(100 * (1 - 1 / 16))
    assert stats["cache_multiplier"] == pytest.approx(16)
    assert stats["bytes_per_token"] == 2 * 16 * 4


@pytest.mark.parametrize("rope_dim,reduction,multiplier", [(0, 98.4375, 64.0), (64, 96.875, 32.0)])
def test_production_mla_stats_2048x32(rope_dim, reduction, multiplier):
    """The original project's 98.4 % / 64x is MLA with the latent = MQA's K+V width / 2 and no
    RoPE key; DeepSeek's decoupled RoPE key (rope_dim=64) brings it back to MQA's 96.9 % / 32x."""
    model = ProductionFastMQA(hidden_dim=2048, num_heads=32, enable_mla=True, mla_compression=0.5, rope_dim=rope_dim)
    out, stats = model(torch.randn(1, 4, 2048), return_cache_stats=True)
    assert stats["reduction_percent"] == pytest.approx(reduction)
    assert stats["cache_multiplier"] == pytest.approx(multiplier)
    spec = memory.mla(32, 64, kv_lora_rank=64, rope_dim=rope_dim)
    assert stats["reduction_percent"] == pytest.approx(memory.reduction_percent(spec, memory.mha(32, 64)))


def test_production_stats_with_a_preallocated_cache():
    from fastmqa.generate import KVCache
    model = ProductionFastMQA(64, 4, causal=True)
    cache = KVCache.for_layer(model.attn, batch=2, max_seq_len=32)
    cache.step(5)
    out, stats = model(torch.randn(2, 5, 64), return_cache_stats=True, kv_cache=cache.layer(0))
    assert stats["cache_bytes"] == cache.nbytes() == 2 * 2 * 32 * 16 * 4
    assert stats["reduction_percent"] == pytest.approx(75.0)


# -- GPU ---------------------------------------------------------------------------------
@gpu
@needs_cuda
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_layer_bf16(causal):
    torch.manual_seed(6)
    layer = FastMQALayer(1024, 8, causal=causal).cuda()
    ref = copy.deepcopy(layer)
    ref.use_flash = False
    x = torch.randn(2, 300, 1024, device="cuda")
    with torch.no_grad():
        truth = copy.deepcopy(layer).double()(x.double())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            within_rule(layer(x), ref(x), truth, torch.bfloat16, f"cuda layer bf16 causal={causal}")
        within_rule(layer(x * 1e6), ref(x * 1e6), copy.deepcopy(layer).double()(x.double() * 1e6),
                    torch.float32, "cuda layer x1e6")


@gpu
@needs_cuda
def test_gpu_compile_layer():
    layer = FastMQALayer(1024, 8, causal=True).cuda().to(torch.bfloat16)
    x = torch.randn(2, 256, 1024, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), layer(x), atol=2e-2, rtol=2e-2)


def test_bench_layer_suite_plumbing_on_cpu(monkeypatch):
    """The `layer` suite's workloads at toy sizes on the CPU, with a stand-in timer; the rows
    must pass fastmqa.bench's schema check."""
    from fastmqa import bench, bench_layer
    for name, val in dict(DEVICE="cpu", HIDDEN=64, HEADS=8, TOKENS=64, DECODE_CONTEXTS=(16, 32)).items():
        monkeypatch.setattr(bench_layer, name, val)
    class FakeTimer:  # runs every fn; times: ours 1 ms, the others 2, 2 and 4 ms over 3 repetitions
        calls, leads = [], []

        def side_by_side(self, fns, reps=None, lead=False, warmup=None):
            for fn in fns.values():
                fn()
            self.calls.append(sorted(fns))
            return {m: [1.0] * 3 if m == "fastmqa.layer" else [2.0, 2.0, 4.0] for m in fns}

        def __call__(self, fn, reps=None, lead=False, warmup=None):
            fn()
            self.leads.append(lead)
            return 1.0
    timer = FakeTimer()
    rows, skipped = bench_layer.suite_layer(timer, quick=True)
    assert not skipped and len(rows) == 3 * 2 * 2 + 6 * 2
    # prefill rows: the three layers timed side by side, once per shape and pass
    assert timer.calls == [sorted(bench_layer._prefill_layers())] * (2 * 2)
    ours = [r for r in rows if r["kind"] == "layer" and r["impl"] == "fastmqa.layer"]
    assert len(ours) == 4 and all(r["x_mha"] == [2.0, 2.0, 3.0] and r["x_sdpa_gqa_layer"] == [2.0, 2.0, 3.0]
                                  for r in ours)
    assert all(r["ms"] == (1.0 if r["impl"] == "fastmqa.layer" else 2.0) for r in rows if r["kind"] == "layer")
    # decode rows: one GPU-side time per layer and batch, launches queued ahead
    assert timer.leads == [True] * (6 * 2)
    bench.validate_results(dict(suite="layer", device="cpu", torch="", cuda="", date="", rows=rows,
                                ceilings=dict(copy_gbps=1, bf16_tflops=1, fp32_tflops=1)))
    dec = [r for r in rows if r["kind"] == "decode"]
    assert {r["attention"] for r in dec} == {"MHA", "GQA-8", "MQA", "MLA", "MLA-512"}
    by = {(r["attention"], r["impl"], r["B"]): r for r in dec}
    # per-token cache bytes, bf16: MHA 2*H*D*2, GQA-8 2*8*D*2, MQA 2*D*2, MLA (D + 64)*2
    assert by[("MHA", "torch.sdpa_gqa_layer", 1)]["bytes_per_token"] == 2 * 8 * 8 * 2
    assert by[("GQA-8", "torch.sdpa_gqa_layer", 1)]["bytes_per_token"] == 2 * 8 * 8 * 2
    assert by[("MQA", "fastmqa.layer", 16)]["bytes_per_token"] == 2 * 8 * 2
    assert by[("MLA", "fastmqa.mla", 16)]["bytes_per_token"] == (8 + 64) * 2
    assert by[("MLA-512", "fastmqa.mla", 1)]["bytes_per_token"] == (512 + 64) * 2
    assert {r["pass"] for r in rows if r["kind"] == "layer"} == {"fwd", "fwd+bwd"}
