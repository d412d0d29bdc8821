"""fastmqa.generate: the KV cache, cached attention and greedy generation."""
import pytest
import torch

from fastmqa import memory
from fastmqa.generate import KINDS, DecoderLM, KVCache, select_decode_kernel
from fastmqa.layers import FastMQALayer, GQALayer
from fastmqa.reference import attention_ref

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def model(kind, seed=0, **kw):
    torch.manual_seed(seed)
    return DecoderLM(vocab_size=61, hidden_dim=64, num_heads=4, num_layers=2, attention=kind, kv_heads=2,
                     max_seq_len=64, rope_dim=8, **kw).eval()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lengths", [None, [7, 3, 5]])
def test_generation_equals_recompute_fp32(kind, lengths):
    m = model(kind)
    prompt = torch.randint(0, 61, (3, 7), generator=torch.Generator().manual_seed(1))
    toks, logits = m.generate(prompt, 6, lengths=lengths, return_logits=True)
    toks2, logits2 = m.generate_recompute(prompt, 6, lengths=lengths, return_logits=True)
    assert torch.equal(toks, toks2)
    assert torch.allclose(logits, logits2, atol=1e-5, rtol=1e-5)


def teacher_forced(m, tokens, prefill, dtype):
    """Logits of tokens[:, prefill-1:] computed by prefill + one-token decode steps."""
    cache = m.new_cache(tokens.shape[0], tokens.shape[1], dtype=dtype)
    cache.step(prefill)
    out = [m(tokens[:, :prefill], cache)[:, -1:]]
    for t in range(prefill, tokens.shape[1]):
        cache.step(1)
        out.append(m(tokens[:, t:t + 1], cache))
    return torch.cat(out, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_cache_within_rule(kind):
    """bf16: cached logits vs the fp64 full pass, within 2x the bf16 full pass's error + floor."""
    m = model(kind)
    tokens = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        truth = m.double()(tokens)[:, 5:]
        full = m.to(torch.bfloat16)(tokens)[:, 5:]
        cached = teacher_forced(m, tokens, 6, torch.bfloat16)
    err, terr = (cached.double() - truth).abs().max(), (full.double() - truth).abs().max()
    assert err <= 2 * terr + 1e-3, f"{kind}: cached err {err:.3e} vs full-pass bf16 err {terr:.3e}"


def test_ragged_append_writes_each_sequence_at_its_length():
    cache = KVCache("mqa", 1, batch=2, max_seq_len=8, num_heads=2, head_dim=3)
    slot = cache.layer(0)
    cache.step(4)
    slot.append(torch.ones(2, 4, 3), torch.ones(2, 4, 3))
    cache.trim([2, 4])
    cache.step(1)
    slot.append(torch.full((2, 1, 3), 7.0), torch.full((2, 1, 3), 7.0))
    assert cache.lengths == [3, 5] and cache.cache_seqlens.tolist() == [3, 5]
    assert cache.k[0][0, 2].tolist() == [7.0] * 3 and cache.k[0][1, 4].tolist() == [7.0] * 3
    assert cache.k[0][0, 3].tolist() == [1.0] * 3          # stale padding, past the length
    assert slot.positions(1).tolist() == [[2], [4]]


def test_cached_attention_paths_on_cpu():
    torch.manual_seed(0)
    for layer, path_uniform in ((FastMQALayer(32, 4, causal=True), "mqa_attention:reference"),
                                (GQALayer(32, 4, 2, causal=True), "sdpa")):
        cache = KVCache.for_layer(layer, batch=2, max_seq_len=10)
        slot = cache.layer(0)
        x = torch.randn(2, 6, 32)
        cache.step(6)
        with torch.no_grad():
            y = layer(x, kv_cache=slot)
            assert slot.last_path == path_uniform
            assert torch.allclose(y, layer(x), atol=1e-5)
            cache.trim([6, 4])
            cache.step(1)
            layer(x[:, :1], kv_cache=slot)
            assert slot.last_path == "reference"


def test_cache_memory_matches_the_model():
    H, D, B, S = 8, 16, 2, 32
    for kind, kw, spec in (("mha", {}, memory.mha(H, D)), ("gqa", dict(kv_heads=2), memory.gqa(H, D, 2)),
                           ("mqa", {}, memory.mqa(H, D)), ("mla", dict(latent_dim=24), memory.mla(H, D, 16, 8))):
        cache = KVCache(kind, 3, B, S, H, D, **kw)
        assert cache.nbytes() == 3 * memory.cache_bytes(spec, B, S, torch.float32)
        assert cache.stats()["reduction_percent"] == pytest.approx(memory.reduction_percent(spec, memory.mha(H, D)))


def test_cache_errors():
    cache = KVCache("mqa", 1, batch=2, max_seq_len=4, num_heads=2, head_dim=3)
    with pytest.raises(ValueError, match="holds 4 tokens per sequence; this step needs 5"):
        cache.step(5)
    cache.step(2)
    with pytest.raises(ValueError, match="reserved \\[2, 2\\] positions per sequence but the layer got 3"):
        cache.layer(0).append(torch.zeros(2, 3, 3), torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="lengths must lie between"):
        cache.trim([3, 1])
    with pytest.raises(ValueError, match="kind must be one of"):
        KVCache("mqa2", 1, 1, 4, 2, 3)
    with pytest.raises(ValueError, match="a GQA cache needs kv_heads dividing num_heads=4"):
        KVCache("gqa", 1, 1, 4, 4, 3, kv_heads=3)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model("mqa").generate(torch.zeros(1, 60, dtype=torch.long), 10)


def test_select_decode_kernel_by_capability(monkeypatch):
    from fastmqa import kernels
    fake = lambda name, kind, max_sq: kernels.Kernel(name, name, kind, "x.cu", "x", dtypes=(torch.bfloat16,), max_sq=max_sq)
    monkeypatch.setattr(kernels, "REGISTRY", [fake("06_mma", "prefill", None), fake("20_decode", "decode", 8)])
    assert select_decode_kernel(torch.bfloat16, 128, True, 1).name == "20_decode"
    assert select_decode_kernel(torch.bfloat16, 128, True, 9) is None      # more query rows than it takes
    assert select_decode_kernel(torch.float32, 128, True, 1) is None
    assert select_decode_kernel(torch.bfloat16, 128, True, 1, "cpu") is None


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["mqa", "mla"])
def test_gpu_decode_kernel_matches_reference(kind):
    """Ragged bf16 decode on CUDA (the registry decode kernel if one supports it) vs the reference."""
    torch.manual_seed(0)
    layer = (FastMQALayer(1024, 8, causal=True) if kind == "mqa" else
             DecoderLM(hidden_dim=1024, num_heads=8, attention="mla", kv_lora_rank=512, rope_dim=64,
                       num_layers=1).blocks[0].attn)   # a 576-wide latent row, as DeepSeek-V2
    layer = layer.cuda().to(torch.bfloat16).eval()
    cache = KVCache.for_layer(layer, batch=3, max_seq_len=300)
    slot = cache.layer(0)
    x = torch.randn(3, 257, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        cache.step(257)
        layer(x, kv_cache=slot)
        cache.trim([257, 100, 31])
        cache.step(1)
        q = torch.randn(3, 8, 1, cache.k[0].shape[-1], device="cuda", dtype=torch.bfloat16)
        out = slot.attend(q, causal=True)
        ref = attention_ref(q.double(), cache.k[0].double(), slot.v.double(), causal=True, seqlens=cache.cache_seqlens)
        torch_out = attention_ref(q, cache.k[0], slot.v, causal=True, seqlens=cache.cache_seqlens)
    err, terr = (out.double() - ref).abs().max(), (torch_out.double() - ref).abs().max()
    assert err <= 2 * terr + 1e-5, f"{slot.last_path}: {err:.3e} vs torch {terr:.3e}"


@gpu
@needs_cuda
@pytest.mark.parametrize("rank", [512, 128])
def test_gpu_decode_step_direct_and_buffered_paths_agree(rank):
    """KVCache's decode launch reads a dense q where it lies and writes a new output each step;
    another layout goes through the prepared q buffer. Both give the same bits, and an earlier
    step's output is not overwritten by a later step. rank 128 + RoPE 64: a 192-wide latent row
    (10_decode), rank 512: 576 (11_decode_mla)."""
    torch.manual_seed(1)
    layer = DecoderLM(hidden_dim=1024, num_heads=8, attention="mla", kv_lora_rank=rank, rope_dim=64,
                      num_layers=1).blocks[0].attn.cuda().to(torch.bfloat16).eval()
    cache = KVCache.for_layer(layer, batch=2, max_seq_len=200)
    slot = cache.layer(0)
    with torch.no_grad():
        cache.step(150)
        layer(torch.randn(2, 150, 1024, device="cuda", dtype=torch.bfloat16), kv_cache=slot)
        cache.step(1)
        Dk = cache.k[0].shape[-1]
        wide = torch.randn(2, 8, 1, 2 * Dk, device="cuda", dtype=torch.bfloat16)
        q_strided = wide[..., :Dk]                      # not contiguous: the buffered path
        q_dense = q_strided.contiguous()                # the direct path
        out_dense = slot.attend(q_dense, causal=True)
        assert slot.last_path == ("10_decode" if rank == 128 else "11_decode_mla")
        first = out_dense.clone()
        out_strided = slot.attend(q_strided, causal=True)
        slot.attend(torch.randn_like(q_dense), causal=True)  # a later step
        ref = attention_ref(q_dense.double(), cache.k[0].double(), slot.v.double(), causal=True,
                            seqlens=cache.cache_seqlens)
    assert torch.equal(out_dense, first) and torch.equal(out_dense, out_strided)
    torch_out = attention_ref(q_dense, cache.k[0], slot.v, causal=True, seqlens=cache.cache_seqlens)
    assert (out_dense.double() - ref).abs().max() <= 2 * (torch_out.double() - ref).abs().max() + 1e-5
