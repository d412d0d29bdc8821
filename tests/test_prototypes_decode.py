"""The split-KV decode prototype (fastmqa/prototypes/decode.py) against float64, in the simulator.

Ragged caches with lengths 0, 1, non-multiples of the tile (TILE = 4) and the full cache; Sq
from 1 to 3 (causal leaves rows that see no key when Sq > len); more splits than tiles (empty
splits); plus the split rule and the numpy combine.
"""
import numpy as np
import pytest
import torch

from fastmqa import sim

sim.setup("auto", quiet=True)

from fastmqa.prototypes import decode  # noqa: E402

# (B, H, Sq, Smax, lens)
SHAPES = [
    (1, 1, 1, 1, [1]),
    (3, 2, 1, 13, [13, 0, 1]),
    (4, 3, 2, 10, [10, 7, 2, 5]),
    (2, 2, 3, 9, [1, 9]),
]


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Sq{}S{}".format(*s[:4]))
def test_decode_prototype_vs_fp64(shape, causal, num_splits, random_qkv, check_vs_fp64):
    B, H, Sq, S, lens = shape
    q, k, v = random_qkv(B, H, Sq, S, 8, seed=B * 100 + S + num_splits)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    out, lse = decode.mqa_decode_splitkv(q, k, v, causal=causal, seqlens=seqlens, num_splits=num_splits,
                                         return_lse=True)
    check_vs_fp64(out, lse, q, k, v, causal=causal, seqlens=seqlens, what=f"decode prototype, {num_splits} splits")


def test_split_ranges_cover_each_sequence_once():
    for length in range(0, 30):
        for n in range(1, 9):
            ranges = [decode.split_range(length, n, s) for s in range(n)]
            keys = [j for k0, k1 in ranges for j in range(k0, k1)]
            assert keys == list(range(length)), (length, n, ranges)
            assert all(k0 % decode.TILE == 0 for k0, k1 in ranges if k1 > k0), "chunks start on a tile"


def test_kernel_combine_matches_numpy_combine(random_qkv):
    B, H, Sq, S = 2, 2, 1, 11
    q, k, v = random_qkv(B, H, Sq, S, 8, seed=7)
    seqlens = torch.tensor([11, 3], dtype=torch.int32)
    out, lse, (part_o, part_lse) = decode.mqa_decode_splitkv(q, k, v, seqlens=seqlens, num_splits=3,
                                                              return_lse=True, return_partials=True)
    assert np.isneginf(part_lse[1:, 1]).all(), "a 3-key sequence fills only the first split"
    o_np, lse_np = decode.combine_partials(part_o, part_lse)
    np.testing.assert_allclose(out.reshape(B, H * Sq, -1).numpy(), o_np, atol=1e-6)
    np.testing.assert_allclose(lse.reshape(B, H * Sq).numpy(), lse_np, atol=1e-6)


def test_choose_splits_fills_the_gpu_in_whole_waves():
    # 132 SMs, one CTA each (10_decode's config); tiles of 64 keys
    assert decode.choose_splits(base=64, tiles=64, slots=132) == 2        # B=64, S=4k: 128 CTAs
    assert decode.choose_splits(base=1, tiles=16, slots=132) == 16        # B=1, S=1k: every tile its own CTA
    assert decode.choose_splits(base=1, tiles=512, slots=132) == 128      # B=1, S=32k: capped at 128
    assert decode.choose_splits(base=128, tiles=512, slots=132) == 1      # enough CTAs already
    for base in (1, 3, 16, 50):
        for tiles in (1, 2, 7, 64, 300):
            s = decode.choose_splits(base, tiles, 132)
            c = -(-tiles // s)
            assert 1 <= s <= max(1, tiles) and -(-tiles // c) == s, (base, tiles, s)


def test_split_slots_takes_fewer_longer_ctas_for_small_caches():
    """10_decode's split rule on the H100 (132 SMs, L2 50 MB; results/decode_sweep_dev.json): the
    split counts the measured sweep found best (within 2.5 %) at small batch."""
    kv = lambda B, S: B * S * 128 * 2 * 2  # bf16 K and V, D = 128
    pick = lambda B, S: decode.choose_splits(B, S // 64, decode.split_slots(132, B, kv(B, S)))
    assert pick(1, 16384) == 64      # 8 MB: half the SMs (128 splits measured 15 % slower)
    assert pick(1, 32768) == 64
    assert pick(2, 8192) == 32
    assert pick(4, 4096) == 16
    assert pick(4, 16384) == 24      # 34 MB: three quarters
    assert pick(4, 32768) == 31      # 67 MB: all of them, as before
    assert pick(16, 4096) == 8       # 16 row blocks: the combine has 512 CTAs, all of them
    assert pick(1, 1024) == 16       # latency-bound: every tile its own CTA, as before
    assert decode.split_slots(132, 1, 10**9, l2_bytes=0) == 132  # no L2 size known: the plain rule


def test_intensity_mqa_is_h_times_mha():
    assert decode.intensity(32, 32) == 1.0                                 # MHA, bf16: 1 flop per byte
    assert decode.intensity(32, 1) == 32 * decode.intensity(32, 32)
    assert decode.intensity(32, 8, Sq=4) == 16.0


def test_paged_table_pairs_dense_and_paged_rows():
    row = lambda impl, B, S, ms, **kw: dict(impl=impl, kind="decode", B=B, Skv=S, ms=ms, gbps=1.0, **kw)
    data = {"rows": [row("10_decode", 1, 4096, 0.010), row("10_decode.paged", 1, 4096, 0.011, page_size=256),
                     row("10_decode", 4, 4096, 0.020),                       # no paged row: left out
                     row("10_decode", 1, 4096, 0.5, num_splits=1, sweep=True),  # sweep rows do not count
                     row("torch.sdpa_gqa", 1, 4096, 0.009)]}
    t = decode.paged_table(data)
    assert [(r["B"], r["S"], r["page"]) for r in t] == [(1, 4096, 256)]
    assert t[0]["paged_vs_dense"] == pytest.approx(1.1)
    assert t[0]["dense_us"] == pytest.approx(10.0) and t[0]["paged_us"] == pytest.approx(11.0)


def test_targets_table_checks_each_target_against_its_point():
    """targets_table: >= 90 % of the copy ceiling from 64 MiB, no slower than the copy below it,
    >= SDPA everywhere, 2x SDPA where SDPA is under 40 % of the ceiling (with that target's time)."""
    MB = 2**20

    def rows(B, S, kv, ours_ms, sdpa_ms, copy_ms):
        extra = dict(kind="decode", B=B, Skv=S, kv_bytes=kv, copy_ms=copy_ms, copy1_ms=copy_ms / 2, launch_ms=0.004)
        return [dict(impl="10_decode", ms=ours_ms, gbps=kv / ours_ms / 1e6, **extra),
                dict(impl="10_decode", ms=ours_ms * 9, gbps=1.0, num_splits=1, sweep=True, **extra),
                dict(impl="torch.sdpa_gqa", ms=sdpa_ms, gbps=kv / sdpa_ms / 1e6, **extra)]
    data = {"ceilings": {"copy_gbps": 3000.0},
            "rows": rows(1, 1024, 1 * MB, 0.010, 0.030, 0.012)        # small: faster than copy, 3x SDPA (1 %)
            + rows(4, 4096, 8 * MB, 0.020, 0.019, 0.015)             # small: slower than copy and SDPA
            + rows(64, 32768, 1024 * MB, 0.370, 0.380, 0.720)        # big: 2902 GB/s = 97 % of the ceiling
            + rows(16, 32768, 256 * MB, 0.150, 0.140, 0.190)}        # big: 1790 GB/s = 60 %, slower than SDPA
    t = {(r["B"], r["S"]): r for r in decode.targets_table(data)}
    assert t[1, 1024]["met"] == "copy,sdpa,2x_sdpa" and t[1, 1024]["missed"] == "-"
    assert t[1, 1024]["target_2x_us"] == pytest.approx(15.0) and t[1, 1024]["copy1_us"] == pytest.approx(6.0)
    assert t[4, 4096]["met"] == "-" and t[4, 4096]["missed"] == "copy,sdpa,2x_sdpa"
    assert t[64, 32768]["met"] == "of_copy,sdpa" and t[64, 32768]["target_2x_us"] is None
    assert t[16, 32768]["missed"] == "of_copy,sdpa"


def test_bandwidth_table_prefers_the_paired_ratio_to_the_best_sdpa_path():
    """A row's paired x_sdpa ([median, q1, q3] against `vs`) is the table's x_sdpa when `vs` is the
    path of lowest median; without it (or against another path) the ratio of the medians."""
    extra = dict(kind="decode", B=1, Skv=1024, kv_bytes=2**20, copy_ms=0.01, copy1_ms=0.005, launch_ms=0.004)
    sdpa = [dict(impl="torch.sdpa_gqa", ms=0.011, gbps=95.0, **extra),
            dict(impl="torch.sdpa_flash", ms=0.014, gbps=75.0, **extra)]

    def table(**ours):
        row = dict(impl="10_decode", ms=0.010, gbps=105.0, **extra, **ours)
        return decode.bandwidth_table({"ceilings": {"copy_gbps": 3000.0}, "rows": [row] + sdpa})[0]
    t = table(x_sdpa=[0.98, 0.95, 1.02], vs="torch.sdpa_gqa")
    assert t["sdpa"] == "torch.sdpa_gqa" and t["x_sdpa"] == 0.98
    assert (t["x_sdpa_q1"], t["x_sdpa_q3"]) == (0.95, 1.02)
    assert decode.targets_table({"ceilings": {"copy_gbps": 3000.0},
                                 "rows": [dict(impl="10_decode", ms=0.010, gbps=105.0, x_sdpa=[0.98, 0.95, 1.02],
                                               vs="torch.sdpa_gqa", **extra)] + sdpa})[0]["missed"] == "sdpa,2x_sdpa"
    for ours in ({}, dict(x_sdpa=[0.5, 0.4, 0.6], vs="torch.sdpa_flash")):
        t = table(**ours)
        assert t["x_sdpa"] == pytest.approx(1.1) and t["x_sdpa_q1"] is None


def test_kv_policy_and_policy_table():
    """evict_normal from 4x L2 of K and V up (the launcher's rule); the table pairs the two
    variants' rows of a point and flush and divides their paired medians."""
    MB = 2**20
    assert decode.kv_policy(199 * MB) == "evict_first" and decode.kv_policy(200 * MB) == "evict_normal"
    assert decode.kv_policy(10**12, l2_bytes=0) == "evict_first"

    def row(flush, B, S, impl, us, vs):
        return dict(flush=flush, B=B, S=S, impl=impl, us=us, GBps=1.0, vs_ours=dict(median=vs, q1=vs, q3=vs))
    data = {"rows": [row("clean", 64, 32768, "10_decode_first", 360.0, 1.0), row("clean", 64, 32768, "10_decode_normal", 350.0, 0.97),
                     row("write", 4, 32768, "10_decode_first", 39.0, 1.0), row("write", 4, 32768, "10_decode_normal", 43.0, 1.1),
                     row("write", 4, 32768, "sdpa_gqa", 44.0, 1.13), row("write", 1, 1024, "10_decode", 12.0, 1.0)]}
    t = decode.policy_table(data)
    assert [(r["flush"], r["B"]) for r in t] == [("write", 4), ("clean", 64)]
    assert t[0]["normal_vs_first"] == pytest.approx(1.1) and t[0]["picks"] == "evict_first" and t[0]["kv_MB"] == 64
    assert t[1]["normal_vs_first"] == pytest.approx(0.97) and t[1]["picks"] == "evict_normal"


def test_decode_splits_takes_one_split_for_short_caches_at_large_batch():
    kv = lambda B, S: B * S * 128 * 2 * 2
    assert decode.decode_splits(64, 16, 132, kv(64, 1024)) == 1     # B=64, S=1k: no partials to merge
    assert decode.decode_splits(64, 32, 132, kv(64, 2048)) == 2     # S=2k: two splits, as choose_splits
    assert decode.decode_splits(16, 16, 132, kv(16, 1024)) == decode.choose_splits(16, 16, 132) > 1
    assert decode.decode_splits(1, 16, 132, kv(1, 1024)) == 16
