"""Chapter 08 prototype: split-KV decoding (Flash-Decoding) over a ragged MQA KV cache.

The algorithm of kernels/10_decode.cu in float32, without tensor cores, in two numba.cuda
kernels (simulator-friendly at tiny sizes):

* `decode_partial_kernel`: block (s, b) owns split s of sequence b's keys, and its threads are
  the M = H * Sq query rows of sequence b (row = h * Sq + i, the order of q[b]). The threads load
  each K/V tile into shared memory together, so one tile read serves every head. Each thread
  runs the online softmax over its split's tiles and writes a *normalised* partial output
  o_s = sum_j p_j v_j / l_s and its log-sum-exp lse_s = m_s + log(l_s) (-inf for a split that
  saw no key: an empty chunk, or a row that is causally masked there).
* `decode_combine_kernel`: one thread per (b, row) merges the splits:
  lse = log(sum_s exp(lse_s)),  o = sum_s exp(lse_s - lse) o_s.

* `decode_partial_paged_kernel` (runner `mqa_decode_paged`): the first kernel over a paged cache
  (fastmqa.paged: key j of sequence b at row j % P of page block_table[b, j // P]); only the
  tile load differs, the online-softmax step is the device function `_tile_update`.

Sequence b's keys [0, seqlens[b]) are cut into `num_splits` chunks of whole tiles, as the
CUDA kernel does: chunk = ceil(ceil(len / num_splits) / TILE) * TILE, split s covers
[s * chunk, (s + 1) * chunk) clipped to len; trailing splits of a short sequence are empty.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import float32

from .. import sim, validate
from ._common import prepare, to_device

# numba's simulator swaps the module-global `cuda` while it runs a kernel, so the
# switch (fastmqa.sim) is thrown before this import and `cuda` must be a global here.
cuda = sim.cuda()

TILE = 4     # keys per K/V tile (the CUDA kernel uses 64; small here so tiny caches span tiles)
DMAX = 128   # largest head dim (shared and local arrays need a constant size)


def split_range(length, num_splits, s):
    """Keys [k0, k1) of split s of a sequence of `length` keys (the kernel's rule)."""
    per_split = (length + num_splits - 1) // num_splits
    chunk = (per_split + TILE - 1) // TILE * TILE
    k0 = min(length, s * chunk)
    return k0, min(length, k0 + chunk)


_split_range = cuda.jit(device=True)(split_range)


@cuda.jit(device=True)
def _tile_update(q, Ks, Vs, acc, b, h, i, n0, j_end, m, l, scale):
    """One tile of the online softmax for query row (b, h, i): keys n0 .. j_end-1 of the tile in
    Ks, Vs; acc holds the unnormalised output. Returns the new running max m and sum l."""
    D = q.shape[3]
    m_new = m
    for jj in range(min(TILE, j_end - n0)):
        dot = 0.0
        for d in range(D):
            dot += q[b, h, i, d] * Ks[jj, d]
        x = dot * scale
        m_new = x if (x != x or x > m_new) else m_new   # NaN wins: NaN inputs give NaN rows
    if m_new == -math.inf:                        # this row has seen no key yet
        return m, l
    alpha = math.exp(m - m_new)
    l *= alpha
    for d in range(D):
        acc[d] *= alpha
    for jj in range(min(TILE, j_end - n0)):
        dot = 0.0
        for d in range(D):
            dot += q[b, h, i, d] * Ks[jj, d]
        p = math.exp(dot * scale - m_new)
        l += p
        for d in range(D):
            acc[d] += p * Vs[jj, d]
    return m_new, l


@cuda.jit(device=True)
def _write_partial(part_o, part_lse, acc, s, b, r, m, l):
    """Split s's partial of row r of sequence b: the normalised output and its log-sum-exp
    (a split that saw no key: zeros and -inf, weight 0 in the combine)."""
    inv = 1.0 / l if l != 0.0 else 0.0
    for d in range(part_o.shape[3]):
        part_o[s, b, r, d] = acc[d] * inv
    part_lse[s, b, r] = m + math.log(l) if l != 0.0 else -math.inf


@cuda.jit
def decode_partial_kernel(q, k, v, lens, part_o, part_lse, scale, causal):
    # q (B, H, Sq, D); k, v (B, Smax, D); lens (B,); part_o (S, B, M, D); part_lse (S, B, M)
    Ks = cuda.shared.array((TILE, DMAX), float32)
    Vs = cuda.shared.array((TILE, DMAX), float32)
    acc = cuda.local.array(DMAX, float32)
    B, H, Sq, D = q.shape
    n_splits = part_o.shape[0]
    s, b, r = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
    M = H * Sq
    h, i = r // Sq, r % Sq
    L = lens[b]
    k0, k1 = _split_range(L, n_splits, s)
    j_end = min(k1, i + L - Sq + 1) if causal else k1   # this row sees keys [k0, j_end)
    m = -math.inf
    l = 0.0
    for d in range(D):
        acc[d] = 0.0
    for n0 in range(k0, k1, TILE):
        for e in range(r, TILE * D, M):          # all rows (= all heads) load the tile together
            jj, d = e // D, e % D
            inside = n0 + jj < k1
            Ks[jj, d] = k[b, n0 + jj, d] if inside else 0.0
            Vs[jj, d] = v[b, n0 + jj, d] if inside else 0.0
        cuda.syncthreads()
        m, l = _tile_update(q, Ks, Vs, acc, b, h, i, n0, j_end, m, l, scale)
        cuda.syncthreads()                        # before the next tile overwrites Ks, Vs
    _write_partial(part_o, part_lse, acc, s, b, r, m, l)


@cuda.jit
def decode_combine_kernel(part_o, part_lse, o, lse):
    # part_o (S, B, M, D), part_lse (S, B, M) -> o (B, M, D), lse (B, M)
    n_splits, B, M, D = part_o.shape
    t = cuda.grid(1)
    if t >= B * M:
        return
    b, r = t // M, t % M
    mx = -math.inf
    for s in range(n_splits):
        x = part_lse[s, b, r]
        mx = x if (x != x or x > mx) else mx     # a NaN split makes the row NaN
    for d in range(D):
        o[b, r, d] = 0.0
    if mx == -math.inf:                           # no split saw a key: zeros, lse = -inf
        lse[b, r] = -math.inf
        return
    total = 0.0
    for s in range(n_splits):
        w = math.exp(part_lse[s, b, r] - mx)      # exp(-inf) = 0 for empty splits
        total += w
        for d in range(D):
            o[b, r, d] += w * part_o[s, b, r, d]
    for d in range(D):
        o[b, r, d] /= total
    lse[b, r] = mx + math.log(total)


def combine_partials(part_o, part_lse):
    """The combine step in numpy (float64), for reading alongside the kernel."""
    part_o, part_lse = np.asarray(part_o, np.float64), np.asarray(part_lse, np.float64)
    mx = part_lse.max(axis=0)
    safe = np.where(np.isfinite(mx), mx, 0.0)
    w = np.exp(part_lse - safe)                   # (S, B, M)
    total = w.sum(axis=0)
    o = (w[..., None] * part_o).sum(axis=0) / np.where(total > 0, total, 1.0)[..., None]
    with np.errstate(divide="ignore"):
        lse = np.where(total > 0, safe + np.log(total), -np.inf)
    return o, lse


def mqa_decode_splitkv(q, k, v, causal=False, scale=None, seqlens=None, num_splits=2, return_lse=False,
                       return_partials=False, cache_seqlens=None):
    """Run the prototype. q (B, H, Sq, D) float32; k, v (B, 1, Smax, D) or (B, Smax, D);
    seqlens (or cache_seqlens) (B,) int32 valid lengths, None = Smax for all.

    Returns out (B, H, Sq, D); with return_lse also lse (B, H, Sq); with return_partials also
    the workspace (part_o (S, B, H*Sq, D), part_lse (S, B, H*Sq)) as numpy arrays."""
    seqlens = cache_seqlens if seqlens is None else seqlens
    qn, kn, vn, scale, (B, H, Sq, Skv, D) = prepare(q, k, v, scale)
    if D > DMAX:
        raise ValueError(f"the prototype handles head dims up to {DMAX}, got D={D}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
    if seqlens is None:
        lens = np.full(B, Skv, dtype=np.int32)
    else:
        validate.check_seqlens(seqlens, B, Skv, seqlens.device)
        lens = seqlens.detach().cpu().numpy().astype(np.int32)
    M = H * Sq
    part_o = np.zeros((num_splits, B, M, D), np.float32)
    part_lse = np.zeros((num_splits, B, M), np.float32)
    o = np.zeros((B, M, D), np.float32)
    lse = np.zeros((B, M), np.float32)
    dq, dk, dv, dl, dpo, dpl, do, dlse = to_device(qn, kn, vn, lens, part_o, part_lse, o, lse)
    if B and M:
        decode_partial_kernel[(num_splits, B), M](dq, dk, dv, dl, dpo, dpl, np.float32(scale), bool(causal))
        decode_combine_kernel[(B * M + 63) // 64, 64](dpo, dpl, do, dlse)
    out = torch.from_numpy(do.copy_to_host().reshape(B, H, Sq, D)).to(q.device)
    res = [out]
    if return_lse:
        res.append(torch.from_numpy(dlse.copy_to_host().reshape(B, H, Sq)).to(q.device))
    if return_partials:
        res.append((dpo.copy_to_host(), dpl.copy_to_host()))
    return res[0] if len(res) == 1 else tuple(res)


# -- a paged cache: the same split-KV kernel reading through a block table -------------------
@cuda.jit
def decode_partial_paged_kernel(q, k_pages, v_pages, table, lens, part_o, part_lse, scale, causal):
    # As decode_partial_kernel, but key j of sequence b is row j % P of page table[b, j // P] of
    # k_pages, v_pages (num_pages, P, D): only the tile load changes.
    Ks = cuda.shared.array((TILE, DMAX), float32)
    Vs = cuda.shared.array((TILE, DMAX), float32)
    acc = cuda.local.array(DMAX, float32)
    B, H, Sq, D = q.shape
    P = k_pages.shape[1]
    n_splits = part_o.shape[0]
    s, b, r = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
    h, i = r // Sq, r % Sq
    L = lens[b]
    k0, k1 = _split_range(L, n_splits, s)
    j_end = min(k1, i + L - Sq + 1) if causal else k1
    m = -math.inf
    l = 0.0
    for d in range(D):
        acc[d] = 0.0
    for n0 in range(k0, k1, TILE):
        for e in range(r, TILE * D, H * Sq):
            jj, d = e // D, e % D
            j = n0 + jj
            if j < k1:                            # pages past the length are never looked up
                page = table[b, j // P]
                Ks[jj, d] = k_pages[page, j % P, d]
                Vs[jj, d] = v_pages[page, j % P, d]
            else:
                Ks[jj, d] = 0.0
                Vs[jj, d] = 0.0
        cuda.syncthreads()
        m, l = _tile_update(q, Ks, Vs, acc, b, h, i, n0, j_end, m, l, scale)
        cuda.syncthreads()
    _write_partial(part_o, part_lse, acc, s, b, r, m, l)


def mqa_decode_paged(q, k_pages, v_pages, block_table, seqlens, causal=False, scale=None, num_splits=2,
                     return_lse=False):
    """Run the paged prototype: q (B, H, Sq, D) float32; k_pages, v_pages (num_pages, P, D) float32;
    block_table (B, max_pages) int32; seqlens (B,) int32 (see fastmqa.paged). Returns out
    (B, H, Sq, D), and with return_lse also lse (B, H, Sq)."""
    from ..paged import check_paged
    validate.check_tensor("q", q, ndim=4, dtypes=(torch.float32,))
    validate.check_tensor("k_pages", k_pages, dtypes=(torch.float32,))
    B, H, Sq, D = q.shape
    _, _, Dk, _ = check_paged(k_pages, v_pages, block_table, seqlens, B=B, device=q.device)
    if Dk != D:
        raise ValueError(f"k_pages must have q's head dim {D}, got {Dk}")
    if D > DMAX:
        raise ValueError(f"the prototype handles head dims up to {DMAX}, got D={D}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
    validate.check_scale(scale)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    M = H * Sq
    arrays = [t.detach().cpu().contiguous().numpy() for t in (q, k_pages, v_pages, block_table, seqlens)]
    part_o = np.zeros((num_splits, B, M, D), np.float32)
    part_lse = np.zeros((num_splits, B, M), np.float32)
    o = np.zeros((B, M, D), np.float32)
    lse = np.zeros((B, M), np.float32)
    dq, dkp, dvp, dt, dl, dpo, dpl, do, dlse = to_device(*arrays, part_o, part_lse, o, lse)
    if B and M:
        decode_partial_paged_kernel[(num_splits, B), M](dq, dkp, dvp, dt, dl, dpo, dpl, np.float32(scale), bool(causal))
        decode_combine_kernel[(B * M + 63) // 64, 64](dpo, dpl, do, dlse)
    out = torch.from_numpy(do.copy_to_host().reshape(B, H, Sq, D)).to(q.device)
    if return_lse:
        return out, torch.from_numpy(dlse.copy_to_host().reshape(B, H, Sq)).to(q.device)
    return out


# -- the launcher's split count, and reading the chapter's results ---------------------------

def choose_splits(base, tiles, slots, max_splits=128):
    """The split count kernels/10_decode.cu chooses (a mirror of choose_splits in decode_common.cuh).

    base: CTAs without splitting (B x row blocks); tiles: key tiles of the longest sequence;
    slots: CTAs resident at once (SMs x CTAs per SM). Fill the slots in whole waves, at least one
    tile per split; of the counts within 95% of the best wave efficiency, the smallest."""
    if 10 * base >= 8 * slots or tiles <= 1:
        return 1
    max_s = min(tiles, max_splits, -(-2 * slots // base))

    def eff(s):
        w = base * s / slots
        return w / math.ceil(w)

    def eligible(s):  # not a smaller count in disguise: ceil(tiles / s)-tile chunks must number s
        c = -(-tiles // s)
        return -(-tiles // c) == s
    cands = [s for s in range(1, max_s + 1) if eligible(s)]
    best = max(eff(s) for s in cands)
    return next(s for s in cands if eff(s) >= 0.95 * best)


def split_slots(slots, base, kv_bytes, l2_bytes=50 * 2**20):
    """The slots 10_decode asks choose_splits to fill (split_slots in decode_common.cuh): every split
    adds a partial to write and to combine, and the combine has one CTA per query row, few when
    base (B x row blocks) is small; so below 16 row blocks a small cache takes fewer, longer CTAs:
    half the slots under half of L2's size of K and V, three quarters under 1.25 x L2, all above.
    (Measured on the H100, L2 = 50 MB: results/decode_sweep_dev.json.)"""
    if base >= 16 or l2_bytes <= 0:
        return slots
    if kv_bytes < l2_bytes // 2:
        return max(1, slots // 2)
    if kv_bytes < l2_bytes * 5 // 4:
        return max(1, slots * 3 // 4)
    return slots


def decode_splits(base, tiles, slots, kv_bytes, l2_bytes=50 * 2**20):
    """10_decode's automatic split count (launch_split_kv in decode_common.cuh): choose_splits over
    split_slots, then one split where one CTA a row block already fills 40 % of the slots and a
    sequence is at most 16 tiles (the partials and their merge cost more than the shorter stream
    saves: H100, B = 64, S = 1k, 23.3 us with one split against 25.8 with two)."""
    slots = split_slots(slots, base, kv_bytes, l2_bytes)
    s = choose_splits(base, tiles, slots)
    return 1 if s > 1 and tiles <= 16 and 5 * base >= 2 * slots else s


def kv_policy(kv_bytes, l2_bytes=50 * 2**20):
    """10_decode's L2 policy for the K/V tiles (kv_policy_normal in decode_common.cuh): evict_first,
    except for caches of at least 4x L2, read with evict_normal."""
    return "evict_normal" if l2_bytes > 0 and kv_bytes >= 4 * l2_bytes else "evict_first"


def policy_table(data, D=128, elem_bytes=2):
    """Per (flush, B, S) of a scripts/dev_decode_fill.py run with variants `first` and `normal`
    (FASTMQA_DECODE_KV_EVICT=0 / 1): both times (us), normal's over first's (each a paired
    median against the default build timed in the same repetitions), and the policy 10_decode
    picks at that size."""
    out = []
    by = {}
    for r in data["rows"]:
        by.setdefault((r["flush"], r["B"], r["S"]), {})[r["impl"]] = r
    for (flush, B, S), here in sorted(by.items(), key=lambda kv: (kv[0][0] != "write", kv[0][1], kv[0][2])):
        first, normal = here.get("10_decode_first"), here.get("10_decode_normal")
        if not (first and normal):
            continue
        kv = 2 * B * S * D * elem_bytes
        out.append(dict(flush=flush, B=B, S=S, kv_MB=kv / 2**20, first_us=first["us"], normal_us=normal["us"],
                        normal_vs_first=normal["vs_ours"]["median"] / first["vs_ours"]["median"],
                        picks=kv_policy(kv)))
    return out


def intensity(num_heads, kv_heads, Sq=1, elem_bytes=2):
    """Flops per byte of K/V read when decoding: 4·H·Sq·S·D flops over 2·G·S·D·elem_bytes bytes."""
    return 4 * num_heads * Sq / (2 * kv_heads * elem_bytes)


def bandwidth_table(data, impl="10_decode"):
    """Per (B, S) of a results/decode.json: our GB/s, the best SDPA path's, the copy's time, and
    the point's floors where the run measured them (copy1_us, launch_us). x_sdpa is the best SDPA
    path's time over ours: the median of the paired per-repetition ratios where the run recorded
    them (rows with `x_sdpa` = [median, q1, q3] against `vs`; x_sdpa_q1/_q3 then give the
    quartiles), else the ratio of the two medians."""
    rows = [r for r in data["rows"] if r["kind"] == "decode" and not r.get("sweep")]
    out = []
    for B, S in sorted({(r["B"], r["Skv"]) for r in rows}):
        here = [r for r in rows if (r["B"], r["Skv"]) == (B, S)]
        ours = next((r for r in here if r["impl"] == impl), None)
        sdpa = min((r for r in here if r["impl"].startswith("torch.")), key=lambda r: r["ms"], default=None)
        if ours is None:
            continue
        paired = ours.get("x_sdpa") if sdpa and ours.get("vs") == sdpa["impl"] else None
        out.append(dict(B=B, S=S, kv_MB=ours["kv_bytes"] / 2**20 if "kv_bytes" in ours else None,
                        us=ours["ms"] * 1e3, GBps=ours["gbps"], of_copy=ours["gbps"] / data["ceilings"]["copy_gbps"],
                        t_vs_copy=ours["ms"] / ours["copy_ms"] if "copy_ms" in ours else None,
                        sdpa=sdpa["impl"] if sdpa else None, sdpa_GBps=sdpa["gbps"] if sdpa else None,
                        x_sdpa=paired[0] if paired else sdpa["ms"] / ours["ms"] if sdpa else None,
                        x_sdpa_q1=paired[1] if paired else None, x_sdpa_q3=paired[2] if paired else None,
                        copy1_us=ours["copy1_ms"] * 1e3 if "copy1_ms" in ours else None,
                        launch_us=ours["launch_ms"] * 1e3 if "launch_ms" in ours else None))
    return out


def targets_table(data, impl="10_decode", big_bytes=64 * 2**20):
    """The decode targets, point by point, from a results/decode.json: at K/V >= big_bytes, at
    least 90 % of the copy ceiling (`of_copy`); below it, no slower than copying K and V
    (`t_vs_copy` <= 1); no slower than the best SDPA path (`x_sdpa` >= 1); and 2x SDPA where
    SDPA reaches under 40 % of the copy ceiling. For that last target the table sets its time,
    half of SDPA's, against the point's floors measured in the same run: one copy kernel moving as
    many DRAM bytes as the decode reads (`copy1_us`) and a near-empty kernel (`launch_us`).
    `met` lists the targets met, `missed` the others (of_copy, copy, sdpa, 2x_sdpa)."""
    ceil = data["ceilings"]["copy_gbps"]
    out = []
    for r in bandwidth_table(data, impl):
        big = r["kv_MB"] * 2**20 >= big_bytes
        sdpa_of_copy = r["sdpa_GBps"] / ceil if r["sdpa_GBps"] else None
        checks = {"of_copy" if big else "copy": (r["of_copy"] >= 0.9) if big else (r["t_vs_copy"] <= 1.0),
                  "sdpa": r["x_sdpa"] >= 1.0}
        row = dict(B=r["B"], S=r["S"], kv_MB=r["kv_MB"], us=r["us"], of_copy=r["of_copy"], t_vs_copy=r["t_vs_copy"],
                   x_sdpa=r["x_sdpa"], sdpa_of_copy=sdpa_of_copy, target_2x_us=None,
                   copy1_us=r["copy1_us"], launch_us=r["launch_us"])
        if sdpa_of_copy is not None and sdpa_of_copy < 0.4:
            checks["2x_sdpa"] = r["x_sdpa"] >= 2.0
            row["target_2x_us"] = r["us"] * r["x_sdpa"] / 2
        row["met"] = ",".join(k for k, ok in checks.items() if ok) or "-"
        row["missed"] = ",".join(k for k, ok in checks.items() if not ok) or "-"
        out.append(row)
    return out


def paged_table(data, impl="10_decode"):
    """Per (B, S): the kernel's time on the dense cache and on the same cache in shuffled pages
    (rows `<impl>.paged` of a results/decode.json), and their ratio."""
    rows = [r for r in data["rows"] if r["kind"] == "decode" and not r.get("sweep")]
    out = []
    for B, S in sorted({(r["B"], r["Skv"]) for r in rows}):
        dense = next((r for r in rows if (r["B"], r["Skv"], r["impl"]) == (B, S, impl)), None)
        paged = next((r for r in rows if (r["B"], r["Skv"], r["impl"]) == (B, S, impl + ".paged")), None)
        if dense and paged:
            out.append(dict(B=B, S=S, page=paged.get("page_size"), dense_us=dense["ms"] * 1e3,
                            paged_us=paged["ms"] * 1e3, paged_GBps=paged["gbps"], paged_vs_dense=paged["ms"] / dense["ms"]))
    return out


def split_sweep(data, impl="10_decode"):
    """{(B, S): [(num_splits, GB/s), ...]} from the rows of a results file that carry num_splits."""
    out = {}
    for r in data["rows"]:
        if r["impl"] == impl and "num_splits" in r:
            out.setdefault((r["B"], r["Skv"]), []).append((r["num_splits"], r["gbps"]))
    return {k: sorted(v) for k, v in out.items()}
