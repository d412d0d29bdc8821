"""fastmqa.mla: Multi-head Latent Attention, naive and absorbed."""
import pytest
import torch

from fastmqa.generate import KVCache
from fastmqa.mla import MultiHeadLatentAttention, apply_rope, latent_rank


def make(causal=False, rope_dim=8, kv_lora_rank=None, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return MultiHeadLatentAttention(64, 4, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, causal=causal).to(dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rope_dim,rank", [(8, None), (0, None), (8, 24), (16, 5)])
def test_absorbed_equals_naive_fp64(causal, rope_dim, rank):
    mla = make(causal, rope_dim, rank)
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    a, b = mla(x, absorb=True), mla(x, absorb=False)
    assert (a - b).abs().max() < 1e-12


def test_absorbed_fp32_close_to_naive_fp64():
    mla = make(True)
    x = torch.randn(2, 9, 64)
    truth = mla(x.double(), absorb=False)
    mla32 = make(True, dtype=torch.float32)
    err = (mla32(x.float(), absorb=True).double() - truth).abs().max()
    assert err < 1e-5 * truth.abs().max()


@pytest.mark.parametrize("absorb", [True, False])
def test_cached_decode_equals_full_sequence(absorb):
    """Prefill 5 tokens, decode 3 one by one through the latent cache == the full causal pass."""
    mla = make(True)
    x = torch.randn(2, 8, 64, dtype=torch.float64)
    full = mla(x, absorb=absorb)
    cache = KVCache.for_layer(mla, batch=2, max_seq_len=16)
    slot = cache.layer(0)
    cache.step(5)
    outs = [mla(x[:, :5], kv_cache=slot, absorb=absorb)]
    for t in range(5, 8):
        cache.step(1)
        outs.append(mla(x[:, t:t + 1], kv_cache=slot, absorb=absorb))
    assert (torch.cat(outs, 1) - full).abs().max() < 1e-12
    assert cache.tensors() == [cache.k[0]] and cache.k[0].shape == (2, 16, mla.latent_dim)


def test_gradcheck_absorbed_layer():
    mla = MultiHeadLatentAttention(16, 2, kv_lora_rank=6, rope_dim=4, causal=True).double()
    x = torch.randn(1, 4, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mla(x, absorb=True), (x,), fast_mode=True)


def test_rope_is_relative():
    """<RoPE(q, p), RoPE(k, p')> depends on p - p' only, and RoPE keeps norms."""
    q, k = torch.randn(2, 16, dtype=torch.float64)
    dot = lambda p, pp: (apply_rope(q, torch.tensor(p)) * apply_rope(k, torch.tensor(pp))).sum()
    assert torch.allclose(dot(7, 3), dot(104, 100))
    assert not torch.allclose(dot(7, 3), dot(7, 4))
    assert torch.allclose(apply_rope(q, torch.tensor(5)).norm(), q.norm())


def test_latent_rank_definition():
    """mla_compression is the latent width relative to MQA's K+V width (2 * head_dim)."""
    assert latent_rank(64, 0.5) == 64
    assert latent_rank(128, 0.25) == 64
    assert latent_rank(64, 0.5, kv_lora_rank=512) == 512
    with pytest.raises(ValueError, match="mla_compression must be a positive number"):
        latent_rank(64, 0)
    with pytest.raises(ValueError, match="rope_dim must be an even int"):
        MultiHeadLatentAttention(64, 4, rope_dim=3)
    with pytest.raises(ValueError, match="kv_lora_rank must be a positive int"):
        MultiHeadLatentAttention(64, 4, kv_lora_rank=0)


def test_mla_cache_is_smaller_than_mqa_only_without_rope():
    for rope_dim, expect in ((0, 100 * (1 - 16 / 128)), (16, 100 * (1 - 32 / 128))):
        mla = MultiHeadLatentAttention(64, 4, rope_dim=rope_dim)    # head_dim 16, latent 16
        stats = KVCache.for_layer(mla, batch=1, max_seq_len=4).stats()
        assert stats["reduction_percent"] == pytest.approx(expect)
