"""The paged KV cache (fastmqa/paged.py) and the paged split-KV prototype, in the simulator.

Pages in shuffled order, page sizes that do and do not divide the prototype's tile (TILE = 4),
lengths 0, 1, a page boundary and the full cache, unused page slots poisoned with NaN (a kernel
that reads past a sequence's length, or through an unused table entry, turns rows NaN).
"""
import pytest
import torch

from fastmqa import sim

sim.setup("auto", quiet=True)

from fastmqa import paged  # noqa: E402
from fastmqa.prototypes import decode  # noqa: E402
from fastmqa.reference import attention_ref  # noqa: E402

# (B, H, Sq, Smax, lens, page_size)
SHAPES = [
    (1, 1, 1, 1, [1], 1),
    (3, 2, 1, 13, [13, 0, 1], 4),
    (4, 3, 2, 10, [10, 7, 3, 5], 3),
    (2, 2, 3, 12, [6, 12], 5),
]


def _paged_case(shape, seed):
    B, H, Sq, S, lens, P = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Sq, 8, generator=g)
    k, v = torch.randn(B, 1, S, 8, generator=g), torch.randn(B, 1, S, 8, generator=g)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    n = sum(-(-L // P) for L in lens) + 2                  # two pages no sequence uses
    order = torch.randperm(n, generator=g).tolist()
    kp, vp, table = paged.from_dense(k, v, seqlens, P, num_pages=n, pages=order, fill=float("nan"))
    return q, k, v, seqlens, kp, vp, table


@pytest.mark.parametrize("num_splits", [1, 2, 5])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Sq{}S{}P{}".format(*s[:4], s[5]))
def test_paged_prototype_vs_fp64(shape, causal, num_splits, check_vs_fp64):
    q, k, v, seqlens, kp, vp, table = _paged_case(shape, seed=sum(shape[:4]) + num_splits)
    out, lse = decode.mqa_decode_paged(q, kp, vp, table, seqlens, causal=causal, num_splits=num_splits,
                                       return_lse=True)
    check_vs_fp64(out, lse, q, k, v, causal=causal, seqlens=seqlens, what=f"paged prototype, {num_splits} splits")


def test_paged_prototype_equals_dense_prototype():
    """The same keys in the same order: the paged kernel gives the dense kernel's bits."""
    q, k, v, seqlens, kp, vp, table = _paged_case(SHAPES[2], seed=3)
    dense = decode.mqa_decode_splitkv(q, k, v, seqlens=seqlens, num_splits=2)
    assert torch.equal(decode.mqa_decode_paged(q, kp, vp, table, seqlens, num_splits=2), dense)


def test_paged_reference_equals_dense_reference():
    q, k, v, seqlens, kp, vp, table = _paged_case(SHAPES[1], seed=5)
    for causal in (False, True):
        got = paged.paged_attention_ref(q.double(), kp.double(), vp.double(), table, seqlens, causal=causal)
        want = attention_ref(q.double(), k.double(), v.double(), causal=causal, seqlens=seqlens)
        assert torch.equal(got, want)


def test_gather_zeros_past_lengths_even_over_nan():
    _, k, v, seqlens, kp, vp, table = _paged_case(SHAPES[3], seed=1)
    kd, vd = paged.gather(kp, vp, table, seqlens)
    assert not kd.isnan().any() and not vd.isnan().any()
    for b, L in enumerate(seqlens.tolist()):
        assert torch.equal(kd[b, :L], k[b, 0, :L]) and not kd[b, L:].any()


def test_cache_appends_ragged_tokens_across_pages():
    g = torch.Generator().manual_seed(0)
    cache = paged.PagedKVCache(num_pages=8, page_size=3, head_dim=4, batch=2, max_pages_per_seq=4)
    ks, vs = [[], []], [[], []]
    for T, lengths in ((4, [4, 2]), (3, [1, 3]), (2, [2, 0])):
        k, v = torch.randn(2, T, 4, generator=g), torch.randn(2, T, 4, generator=g)
        cache.append(k, v, lengths)
        for b in range(2):
            ks[b].append(k[b, :lengths[b]])
            vs[b].append(v[b, :lengths[b]])
    assert cache.lengths == [7, 5] and cache.cache_seqlens.tolist() == [7, 5]
    assert cache.pages_in_use == 3 + 2
    kd, vd = cache.dense()
    for b in range(2):
        assert torch.equal(kd[b, :cache.lengths[b]], torch.cat(ks[b])) and torch.equal(vd[b, :cache.lengths[b]], torch.cat(vs[b]))
    st = cache.stats()
    assert st["tokens"] == 12 and st["paged_bytes"] == 5 * 3 * 2 * 4 * 4 and st["dense_bytes"] == 2 * 7 * 2 * 4 * 4
    q = torch.randn(2, 3, 1, 4, generator=g)
    assert torch.equal(cache.attend(q), attention_ref(q, kd, vd, seqlens=cache.cache_seqlens))


def test_cache_free_returns_pages_lowest_first_and_reuses_them():
    cache = paged.PagedKVCache(num_pages=4, page_size=2, head_dim=2, batch=2)
    cache.append(torch.ones(2, 4, 2), torch.ones(2, 4, 2))           # b0: pages 0, 1; b1: pages 2, 3
    assert cache.block_table[:, :2].tolist() == [[0, 1], [2, 3]] and cache.pages_in_use == 4
    with pytest.raises(RuntimeError, match="page pool is exhausted: this append needs 1 more pages, 0 of 4 are free"):
        cache.append(torch.ones(2, 1, 2), torch.ones(2, 1, 2), [1, 0])
    cache.free(0)
    assert cache.pages_in_use == 2 and cache.lengths == [0, 4] and cache.block_table[0].tolist() == [0, 0, 0, 0]
    cache.append(torch.full((2, 1, 2), 7.0), torch.full((2, 1, 2), 7.0), [0, 1])  # b1 grows into page 0
    assert cache.block_table[1, :3].tolist() == [2, 3, 0] and cache.lengths == [0, 5]
    kd, _ = cache.dense()
    assert kd[1, 4].tolist() == [7.0, 7.0]


@pytest.mark.parametrize("case, err, msg", [
    ("page out of range", ValueError, r"block_table\[0, 1\] = 9 is not a page of the pool \(0 <= page < 4\); "
                                      r"sequence 0 holds 5 tokens, 2 pages of 3"),
    ("int64 table", TypeError, "block_table has dtype int64, expected one of: int32"),
    ("too long", ValueError, r"cache_seqlens must lie in \[0, 6\] \(the cache length\), got min 1 max 7"),
    ("v shape", ValueError, r"v_pages must have k_pages' shape \(4, 3, 2\), got \(4, 2, 2\)"),
])
def test_check_paged_names_the_problem(case, err, msg):
    kp, vp = torch.zeros(4, 3, 2), torch.zeros(4, 3, 2)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    lens = torch.tensor([5, 1], dtype=torch.int32)
    if case == "page out of range":
        table[0, 1] = 9
    elif case == "int64 table":
        table = table.long()
    elif case == "too long":
        lens = torch.tensor([7, 1], dtype=torch.int32)
    else:
        vp = torch.zeros(4, 2, 2)
    with pytest.raises(err, match=msg):
        paged.check_paged(kp, vp, table, lens)


def test_unused_table_entries_are_never_read():
    """Entries past a sequence's pages may hold anything (here out-of-range page numbers)."""
    q, k, v, seqlens, kp, vp, table = _paged_case(SHAPES[1], seed=2)
    need = (seqlens + 3) // 4
    for b in range(table.shape[0]):
        table[b, int(need[b]):] = 10**6
    out = decode.mqa_decode_paged(q, kp, vp, table, seqlens, num_splits=2)
    assert torch.equal(out, decode.mqa_decode_splitkv(q, k, v, seqlens=seqlens, num_splits=2))


def test_cache_bad_arguments():
    with pytest.raises(ValueError, match="page_size must be a positive int, got 0"):
        paged.PagedKVCache(4, 0, 2, 1)
    cache = paged.PagedKVCache(num_pages=4, page_size=2, head_dim=2, batch=1, max_pages_per_seq=2)
    with pytest.raises(ValueError, match="a sequence may hold 4 tokens \\(2 pages of 2\\); this append needs 5"):
        cache.append(torch.ones(1, 5, 2), torch.ones(1, 5, 2))
    with pytest.raises(ValueError, match=r"k and v must be \(batch=1, T, head_dim=2\)"):
        cache.append(torch.ones(1, 2, 3), torch.ones(1, 2, 3))
    with pytest.raises(ValueError, match=r"lengths must be 1 ints in \[0, 2\]"):
        cache.append(torch.ones(1, 2, 2), torch.ones(1, 2, 2), [3])
    with pytest.raises(ValueError, match=r"b must be a sequence index in \[0, 1\)"):
        cache.free(1)


# -- the CUDA kernel's paged path (fastmqa.kernels: prepare_paged; kernels/10_decode.cu) -------
from fastmqa import build, kernels  # noqa: E402

PAGED = [k for k in kernels.REGISTRY if k.paged]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_registry_has_a_paged_kernel_and_its_binding():
    assert [k.name for k in PAGED] == ["10_decode"]
    assert "run_paged" in build.binding_source("k10_decode", paged=True)
    assert "run_paged" not in build.binding_source("k10_decode") and "{paged}" not in build.binding_source("x")


def test_prepare_paged_refuses_before_any_build(monkeypatch):
    monkeypatch.setattr(build, "load", lambda *a, **k: pytest.fail("validation must come before the build"))
    q = torch.randn(2, 4, 1, 64, dtype=torch.bfloat16)
    kp = torch.zeros(4, 64, 64, dtype=torch.bfloat16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    lens = torch.tensor([100, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="kernel 11_decode_mla does not read a paged cache"):
        kernels.get("11_decode_mla").prepare_paged(q, kp, kp, table, lens)
    small = torch.zeros(8, 16, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="page_size must be a multiple of 64 for kernel 10_decode .* got 16"):
        PAGED[0].prepare_paged(q, small, small, table, torch.tensor([30, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"k_pages must have q's head dim 128, got 64"):
        PAGED[0].prepare_paged(torch.randn(2, 4, 1, 128, dtype=torch.bfloat16), kp, kp, table, lens)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="q is on cpu, expected a cuda tensor"):
            PAGED[0].prepare_paged(q, kp, kp, table, lens)


def _cuda_case(B, H, Sq, lens, P, D, dtype, seed):
    """A dense cache and the same keys paged in shuffled order; NaN past every length and in
    the unused pages of the pool, so a read through a wrong row or page shows."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    max_pages = -(-max(lens) // P)
    S = max_pages * P
    q = torch.randn(B, H, Sq, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, 1, S, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, 1, S, D, device="cuda", dtype=dtype, generator=g)
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    n = sum(-(-L // P) for L in lens) + 3
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    kp, vp, table = paged.from_dense(k, v, seqlens, P, num_pages=n, pages=order, fill=float("nan"))
    kd, vd = k.clone(), v.clone()
    for b, L in enumerate(lens):
        kd[b, :, L:] = float("nan")
        vd[b, :, L:] = float("nan")
    return q, kd, vd, seqlens, kp, vp, table


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("P", [64, 128])
def test_paged_kernel_equals_dense_kernel(dtype, D, P):
    """The same keys in the same order, the same split count: the bits of the dense kernel."""
    kern = PAGED[0]
    for causal, Sq, lens in ((False, 1, [1000, 1, 64, 0, 333]), (True, 3, [129, 700, 5, 64, 1000])):
        q, kd, vd, seqlens, kp, vp, table = _cuda_case(5, 8, Sq, lens, P, D, dtype, seed=D + P + Sq)
        for ns in (0, 1, 3):
            dense, dlse = kern(q, kd, vd, causal=causal, cache_seqlens=seqlens, num_splits=ns, return_lse=True)
            run, o, lse = kern.prepare_paged(q, kp, vp, table, seqlens, causal=causal, num_splits=ns, return_lse=True)
            run()
            assert torch.equal(o, dense) and torch.equal(lse, dlse), f"causal={causal} splits={ns}"


@pytest.mark.gpu
@needs_cuda
def test_paged_kernel_vs_fp64_and_cache_attend():
    from fastmqa.check import compare
    kern = PAGED[0]
    q, kd, vd, seqlens, kp, vp, table = _cuda_case(3, 32, 1, [4097, 65, 1], 64, 128, torch.bfloat16, seed=11)
    run, o, _ = kern.prepare_paged(q, kp, vp, table, seqlens)
    run()
    r = compare(o, q, kd, vd, seqlens=seqlens)
    assert r.ok, r
    cache = paged.PagedKVCache(num_pages=40, page_size=64, head_dim=64, batch=2, dtype=torch.float16, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    for T, lengths in ((300, [300, 70]), (1, [1, 1]), (64, [0, 64])):
        cache.append(torch.randn(2, T, 64, device="cuda", dtype=torch.float16, generator=g),
                     torch.randn(2, T, 64, device="cuda", dtype=torch.float16, generator=g), lengths)
    qc = torch.randn(2, 16, 1, 64, device="cuda", dtype=torch.float16, generator=g)
    kd2, vd2 = cache.dense()
    r = compare(cache.attend(qc, kernel=kern), qc, kd2.unsqueeze(1), vd2.unsqueeze(1), seqlens=cache.cache_seqlens)
    assert r.ok, r


# -- the page pool under random appends and frees (hypothesis) ---------------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402

_op = st.one_of(st.tuples(st.just("append"), st.integers(0, 5), st.lists(st.integers(0, 5), min_size=3, max_size=3)),
                st.tuples(st.just("free"), st.integers(0, 2), st.just([])))


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(_op, max_size=12), page_size=st.integers(1, 4))
def test_cache_matches_a_model_under_random_appends_and_frees(ops, page_size):
    """Whatever sequence of appends and frees: the dense view equals the tokens appended since
    each sequence's last free, no page is held twice, and the pool never leaks pages."""
    cache = paged.PagedKVCache(num_pages=9, page_size=page_size, head_dim=2, batch=3, max_pages_per_seq=9)
    model = [[], [], []]
    counter = 0
    for kind, a, lengths in ops:
        if kind == "free":
            cache.free(a)
            model[a] = []
            continue
        T, lengths = a, [min(x, a) for x in lengths]
        k = torch.arange(counter, counter + 3 * T * 2, dtype=torch.float32).reshape(3, T, 2)
        counter += 3 * T * 2
        try:
            cache.append(k, -k, lengths)
        except (RuntimeError, ValueError):          # pool exhausted or a sequence too long:
            assert cache.lengths == [len(m) for m in model]   # nothing changed
            continue
        for b in range(3):
            model[b] += [k[b, t] for t in range(lengths[b])]
    assert cache.lengths == [len(m) for m in model]
    held = [p for b in range(3) for p in cache.block_table[b, :-(-len(model[b]) // page_size)].tolist()]
    assert len(held) == len(set(held)) == cache.pages_in_use, "a page held twice, or a leak"
    kd, vd = cache.dense()
    for b in range(3):
        if model[b]:
            want = torch.stack(model[b])
            assert torch.equal(kd[b, :len(model[b])], want) and torch.equal(vd[b, :len(model[b])], -want)
