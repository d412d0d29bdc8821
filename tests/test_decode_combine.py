"""The split-KV decode kernel's two combines (kernels/10_decode.cu): up to 4 splits the last CTA
of a row block combines them in the decode kernel (arrival counters per stream, reset by that
CTA), more go to the combine kernel. Both meet the tolerance rule, repeated calls give the same
bits (the counters are zero again after every launch), and two streams decoding at once each get
their own counters. GPU only."""
import pytest
import torch

from fastmqa import kernels as registry
from fastmqa.check import compare

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _case(B, H, Sq, lens, D, dtype, seed, S=None):
    g = torch.Generator(device="cuda").manual_seed(seed)
    S = S or max(lens)
    q = torch.randn(B, H, Sq, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, 1, S, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, 1, S, D, device="cuda", dtype=dtype, generator=g)
    kp, vp = k.clone(), v.clone()
    for b, L in enumerate(lens):  # the cache past each length holds garbage in real use
        kp[b, :, L:] = float("nan")
        vp[b, :, L:] = float("nan")
    return q, k, v, kp, vp, torch.tensor(lens, dtype=torch.int32, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("splits", [2, 3, 4, 5, 16])  # in the kernel up to 4, the combine kernel above
@pytest.mark.parametrize("causal", [False, True])
def test_decode_combines_meet_tolerance_and_repeat_bitwise(splits, causal):
    kern = registry.get("10_decode")
    # 64 query rows (2 row blocks), ragged lengths: 0, 1, a tile +- 1, lengths with empty splits
    q, k, v, kp, vp, lens = _case(4, 16, 4, [0, 1, 65, 1000], 128, torch.bfloat16, seed=splits)
    run, o, lse = kern.prepare(q, kp, vp, causal=causal, cache_seqlens=lens, num_splits=splits, return_lse=True)
    outs = []
    for _ in range(3):
        o.fill_(float("nan"))
        run()
        torch.cuda.synchronize()
        outs.append((o.clone(), lse.clone()))
    r = compare(o, q, k, v, causal=causal, seqlens=lens)
    assert r.ok, r
    assert all(torch.equal(a[0], outs[0][0]) and torch.equal(a[1], outs[0][1]) for a in outs[1:])
    assert torch.isneginf(lse[0]).all() and (o[0] == 0).all()  # the empty sequence: zeros, lse = -inf


@pytest.mark.gpu
@needs_cuda
def test_decode_on_two_streams_at_once():
    """Two streams decode different caches concurrently with the in-kernel combine (2 splits):
    each must get its own arrival counters, or one stream's CTAs would count the other's."""
    kern = registry.get("10_decode")
    cases = [_case(8, 32, 1, [4096] * 8, 128, torch.bfloat16, seed=s) for s in (1, 2)]
    streams = [torch.cuda.Stream() for _ in cases]
    preps = []
    for (q, k, v, _, _, lens), st in zip(cases, streams):
        with torch.cuda.stream(st):
            preps.append(kern.prepare(q, k, v, cache_seqlens=lens, num_splits=2))
    torch.cuda.synchronize()
    for _ in range(20):
        for (run, _, _), st in zip(preps, streams):
            with torch.cuda.stream(st):
                run()
    torch.cuda.synchronize()
    for (q, k, v, _, _, lens), (_, o, _) in zip(cases, preps):
        r = compare(o, q, k, v, seqlens=lens)
        assert r.ok, r
