"""Benchmarks: `python -m fastmqa.bench SUITE [SUITE ...]` or `python -m fastmqa.bench all`.

Times registry kernels and PyTorch's paths in one run, on one GPU, with the L2 cache
flushed before every repetition (a 256 MB write), CUDA events, the median of many. The
device ceilings (copy bandwidth, bf16 and fp32 matmul rate) are measured in the same run.
The flush is a write, as Triton's `do_bench` does: it leaves L2 full of dirty lines that a
memory-bound kernel writes back while it reads (decode at 64-256 MB: 7-13 % slower than after a
read-only flush, for us and for SDPA alike; DEVNOTES). Kept, deliberately: it is the common
convention, and every number in the book was taken with it.
Each suite writes results/SUITE.json atomically (temp file + rename):

    {"suite", "device", "torch", "cuda", "date", "ceilings": {copy_gbps, bf16_tflops, fp32_tflops},
     "rows": [{impl, kind, dtype, B, H, Sq, Skv, D, causal, ms, tflops | gbps, ...}]}

`impl` is the registry name for our kernels and torch.<path> for PyTorch's.
The book's tables and plots read these files only (`load_results`).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from . import kernels as registry

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
SUITES = ("fp32", "prefill", "decode", "layer", "backward")
SEED_SHAPE = dict(B=4, H=32, S=512, D=128)  # the original project's fp32 shape
L4_REFERENCE_MS = {"01_naive": 491.0, "02_smem_tiled": 220.0, "03_warp_shuffle": 45.0, "04_cublas": 10.0,
                   "torch": 1.7}  # the original project, NVIDIA L4: another GPU, for context only
OTHER_GPU = {"device": "NVIDIA L4", "source": "the original FastMQA project's README (fp32, B=4, H=32, S=512, D=128)",
             "ms": L4_REFERENCE_MS}
ROW_KEYS = ("impl", "kind", "dtype", "B", "H", "Sq", "Skv", "D", "causal", "ms")


# -- results files -----------------------------------------------------------------
def results_path(suite: str, results_dir=None) -> Path:
    return Path(results_dir or RESULTS) / f"{suite}.json"


def load_results(suite: str, results_dir=None):
    """The parsed results/SUITE.json, or None if it does not exist."""
    p = results_path(suite, results_dir)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e}); rerun `python -m fastmqa.bench {suite}` on the GPU host") from e


def write_results(suite: str, data: dict, results_dir=None) -> Path:
    """Write atomically: an interrupted run never leaves a half-written results file."""
    validate_results(data)
    p = results_path(suite, results_dir)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{suite}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, p)
    except BaseException:  # interrupted or unserialisable: keep the old file, leave no temp file
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def validate_results(data: dict):
    """Raise ValueError if `data` does not follow the results schema."""
    if not isinstance(data, dict):
        raise ValueError(f"results must be a dict, got {type(data).__name__}")
    for key in ("suite", "device", "torch", "cuda", "date", "ceilings", "rows"):
        if key not in data:
            raise ValueError(f"results file lacks top-level key {key!r}")
    if not isinstance(data["ceilings"], dict):
        raise ValueError(f"ceilings must be a dict, got {type(data['ceilings']).__name__}")
    if not isinstance(data["rows"], list) or not all(isinstance(r, dict) for r in data["rows"]):
        raise ValueError(f"rows must be a list of dicts, got {type(data['rows']).__name__}")
    for key in ("copy_gbps", "bf16_tflops", "fp32_tflops"):
        v = data["ceilings"].get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
            raise ValueError(f"ceilings.{key} must be a positive number, got {v!r}")
    for i, row in enumerate(data["rows"]):
        for key in ROW_KEYS:
            if key not in row:
                raise ValueError(f"row {i} ({row.get('impl')}) lacks {key!r}")
        if not (isinstance(row["ms"], (int, float)) and not isinstance(row["ms"], bool) and row["ms"] > 0
                and math.isfinite(row["ms"])):
            raise ValueError(f"row {i} ({row['impl']}) has ms={row['ms']!r}, expected a positive number")
        if row["kind"] in ("prefill",) and "tflops" not in row:
            raise ValueError(f"prefill row {i} ({row['impl']}) lacks 'tflops'")
        if row["kind"] == "decode" and "gbps" not in row:
            raise ValueError(f"decode row {i} ({row['impl']}) lacks 'gbps'")


# -- timing --------------------------------------------------------------------------
class Timer:
    """Median time of fn() in ms, L2 flushed before each repetition.

    lead=True (for calls whose CPU side outlasts the flush, like a Python decode step): a GPU
    spin kernel (`torch.cuda._sleep`) longer than one call's wall time is queued after the flush
    and before the start event, so the CPU has queued the whole call before the GPU reaches it
    and the events time the GPU's work, not the launches (what a CUDA graph would run).
    `side_by_side` times several fns in the same repetitions (paired samples)."""

    def __init__(self, flush_mb=256, reps=30, warmup=3, budget_s=2.0, clean_flush=False):
        self.flush = torch.empty(flush_mb * 2**20 // 4, dtype=torch.float32, device="cuda")
        self.reps, self.warmup, self.budget_s = reps, warmup, budget_s
        self.clean_flush = clean_flush  # after the write, read the buffer: L2 left holding clean lines
        self._cycles_per_ms = None

    def _probe(self, fns, warmup):
        """Warm every fn up, then time one call of them all (wall clock): s."""
        for _ in range(self.warmup if warmup is None else warmup):
            for fn in fns:
                fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for fn in fns:
            fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def _lead_cycles(self, wall_s):
        """Spin cycles covering 2 x wall_s (at least 0.2 ms; wall_s: a probe of every fn once), from a
        one-off calibration of the spin kernel's rate."""
        if self._cycles_per_ms is None:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            n = 2_000_000
            torch.cuda._sleep(n)  # warm
            s.record()
            torch.cuda._sleep(n)
            e.record()
            torch.cuda.synchronize()
            self._cycles_per_ms = n / s.elapsed_time(e)
        return int(self._cycles_per_ms * max(0.2, 2e3 * wall_s))

    def side_by_side(self, fns: dict, reps=None, lead=False, warmup=None, before=None) -> dict:
        """{name: [ms of each repetition]}: every repetition times every fn, each after its own
        flush, in an order that rotates from one repetition to the next; time[i] of two fns are
        a pair taken moments apart (clock and thermal drift cancel in their ratio).
        before: {name: fn} run after that name's flush, outside the events (a dev script's
        conditions, e.g. the same call on other tensors to warm the code)."""
        names = list(fns)
        one = self._probe([fns[n] for n in names], warmup)
        n = reps or max(3, min(self.reps, int(self.budget_s / max(one, 1e-6))))
        cycles = self._lead_cycles(one) if lead else 0
        ev = {m: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
              for m in names}
        for i in range(n):
            for j in range(len(names)):
                m = names[(i + j) % len(names)]
                self.flush.zero_()
                if self.clean_flush:
                    self.flush.amax()
                if before and m in before:
                    before[m]()
                if cycles:
                    torch.cuda._sleep(cycles)
                ev[m][i][0].record()
                fns[m]()
                ev[m][i][1].record()
        torch.cuda.synchronize()
        return {m: [s.elapsed_time(e) for s, e in ev[m]] for m in names}

    def __call__(self, fn, reps=None, lead=False, warmup=None) -> float:
        return statistics.median(self.side_by_side({"fn": fn}, reps=reps, lead=lead, warmup=warmup)["fn"])


def paired_ratio(num, den):
    """Median and quartiles of num[i] / den[i] over paired repetitions (Timer.side_by_side)."""
    r = sorted(a / b for a, b in zip(num, den))
    q = statistics.quantiles(r, n=4, method="inclusive") if len(r) > 1 else [r[0]] * 3
    return dict(median=statistics.median(r), q1=q[0], q3=q[2])


def copy_ceiling(timer: Timer) -> float:
    """Device copy bandwidth in GB/s (bytes read + written) of a 1 GiB copy, timed by `timer`."""
    a = torch.empty(1 << 28, dtype=torch.float32, device="cuda").normal_()
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / timer(lambda: b.copy_(a), reps=10) / 1e6


def measure_ceilings(timer: Timer) -> dict:
    """Device copy bandwidth (bytes read + written) and matmul rates, measured now."""
    copy_gbps = copy_ceiling(timer)
    m = 8192
    x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    bf16 = 2 * m**3 / timer(lambda: x @ y, reps=10) / 1e9
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    xf, yf = x.float()[:4096, :4096].contiguous(), y.float()[:4096, :4096].contiguous()
    fp32 = 2 * 4096**3 / timer(lambda: xf @ yf, reps=10) / 1e9
    torch.backends.cuda.matmul.allow_tf32 = prev
    return {"copy_gbps": round(copy_gbps, 1), "bf16_tflops": round(bf16, 1), "fp32_tflops": round(fp32, 2)}


def attention_flops(B, H, Sq, Skv, D, causal) -> float:
    """4·B·H·Sq·Skv·D, halved for causal (the convention of FlashAttention's benchmarks)."""
    f = 4.0 * B * H * Sq * Skv * D
    return f / 2 if causal else f


# -- PyTorch's paths -----------------------------------------------------------------
def torch_paths(small: bool):
    """{impl: fn(q, k, v, causal)} for PyTorch's attention paths; k, v are (B, 1, Skv, D).
    small: also the paths that materialise the (Sq, Skv) scores (math, matmul+softmax)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def expand(t, H):
        return t.expand(-1, H, -1, -1)

    def forced(backend, expanded):
        def fn(q, k, v, causal):
            H = q.shape[1]
            kk, vv = (expand(k, H), expand(v, H)) if expanded else (k, v)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal and q.shape[2] > 1,
                                                      enable_gqa=not expanded)
        return fn

    def sdpa_expanded(q, k, v, causal):
        H = q.shape[1]
        return F.scaled_dot_product_attention(q, expand(k, H), expand(v, H), is_causal=causal and q.shape[2] > 1)

    def sdpa_gqa(q, k, v, causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and q.shape[2] > 1, enable_gqa=True)

    def matmul_softmax(q, k, v, causal):
        s = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        if causal:
            Sq, Skv = q.shape[2], k.shape[2]
            i = torch.arange(Sq, device=q.device)[:, None]
            j = torch.arange(Skv, device=q.device)[None, :]
            s = s.masked_fill(j > i + (Skv - Sq), float("-inf"))
        return torch.matmul(torch.softmax(s, dim=-1), v)

    paths = {"torch.sdpa_expanded": sdpa_expanded, "torch.sdpa_gqa": sdpa_gqa}
    # Each forced backend with the K/V layout it accepts; EFFICIENT takes expanded K/V.
    paths["torch.sdpa_flash"] = forced(SDPBackend.FLASH_ATTENTION, expanded=False)
    paths["torch.sdpa_cudnn"] = forced(SDPBackend.CUDNN_ATTENTION, expanded=True)
    paths["torch.sdpa_efficient"] = forced(SDPBackend.EFFICIENT_ATTENTION, expanded=True)
    if small:
        paths["torch.sdpa_math"] = forced(SDPBackend.MATH, expanded=False)
        paths["torch.matmul_softmax"] = matmul_softmax
    return paths


def _first_working(fn, q, k, v, causal):
    """None if the path runs on these inputs, else why not (a forced backend may refuse)."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*|fastmqa\..*")
    try:
        fn(q, k, v, causal)
        torch.cuda.synchronize()
        return None
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


# -- suites --------------------------------------------------------------------------
def _progress(total, desc):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, file=sys.stdout, mininterval=2.0, ncols=90)
    except Exception:  # tqdm is optional on the GPU host
        class _P:
            n = 0
            def update(self, k=1):
                self.n += k
                print(f"{desc}: {self.n}/{total}", flush=True)
            def close(self):
                pass
        return _P()


def _row(impl, kind, dtype, B, H, Sq, Skv, D, causal, ms, **extra):
    row = dict(impl=impl, kind=kind, dtype=str(dtype).replace("torch.", ""), B=B, H=H, Sq=Sq, Skv=Skv, D=D,
               causal=bool(causal), ms=round(ms, 5))
    if kind == "prefill":
        row["tflops"] = round(attention_flops(B, H, Sq, Skv, D, causal) / ms / 1e9, 3)
    row.update(extra)
    return row


def _prefill_points(suite, quick):
    """(dtype, B, H, S, D, causal) points of a prefill suite."""
    if suite == "fp32":
        B, H, S, D = SEED_SHAPE.values()
        pts = [(torch.float32, B, H, S, D, False)]
        sweep = [128, 512, 2048] if quick else [128, 256, 1024, 2048, 4096]
        pts += [(torch.float32, B, H, s, D, False) for s in sweep if s != S]
        return pts
    seqs = [512, 2048] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    return [(torch.bfloat16, 16384 // s, 32, s, D, c) for D in (128, 64) for c in (False, True) for s in seqs]


def suite_prefill(suite, timer, quick=False, skip_ms=1000.0):
    """Prefill suites: `fp32` (the chapters' progression) and `prefill` (bf16 tensor cores)."""
    rows, skipped = [], []
    ours = registry.in_suite(suite)
    pts = _prefill_points(suite, quick)
    bar = _progress(len(pts), suite)
    slow = {}  # kernels that passed skip_ms at a smaller S are not run at larger S
    for dtype, B, H, S, D, causal in pts:
        gen = torch.Generator(device="cuda").manual_seed(S)
        q = torch.randn(B, H, S, D, device="cuda", dtype=dtype, generator=gen)
        k = torch.randn(B, 1, S, D, device="cuda", dtype=dtype, generator=gen)
        v = torch.randn(B, 1, S, D, device="cuda", dtype=dtype, generator=gen)
        for kern in ours:
            if kern.supports(dtype, D, causal) is not None:
                continue
            if kern.name in slow:
                skipped.append(dict(impl=kern.name, S=S, D=D, causal=causal, why=f"took {slow[kern.name]:.0f} ms at a smaller S"))
                continue
            launch = kern.prepare(q, k, v, causal=causal)[0]
            ms = timer(launch)
            rows.append(_row(kern.name, "prefill", dtype, B, H, S, S, D, causal, ms))
            if ms > skip_ms:
                slow[kern.name] = ms
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
        small = B * H * S * S * 4 <= 2**31
        for impl, fn in torch_paths(small).items():
            why = _first_working(fn, q, k, v, causal)
            if why:
                skipped.append(dict(impl=impl, S=S, D=D, causal=causal, why=why))
                continue
            ms = timer(lambda: fn(q, k, v, causal))
            rows.append(_row(impl, "prefill", dtype, B, H, S, S, D, causal, ms))
        torch.backends.cuda.matmul.allow_tf32 = prev
        del q, k, v
        bar.update()
    bar.close()
    return rows, skipped


DECODE_GRID = [(B, S) for B in (1, 4, 16, 64) for S in (1024, 4096, 16384, 32768)]


PAGE_SIZE = 256  # the decode suite's paged rows: keys a page (a multiple of the kernels' 64-key tile)


def suite_decode(timer, quick=False):
    """bf16 decode, H=32, D=128: bandwidth = bytes of K and V read / time. Every row also carries
    the point's floors, timed the same way: copy_ms (copying K and V: two copy kernels), copy1_ms
    (one copy kernel of K: as many DRAM bytes read + written as the decode reads) and launch_ms
    (a near-empty kernel). At a point, our kernels, PyTorch's paths and the copies are timed side
    by side (`Timer.side_by_side`: paired repetitions, rotating order), and our rows carry
    `x_sdpa` = [median, q1, q3] of the per-repetition ratio of the best SDPA path's time (`vs`,
    the path of lowest median) to ours: above 1, ours is faster. The split-count sweep rows are
    timed alone after that."""
    rows, skipped = [], []
    H, D, dtype = 32, 128, torch.bfloat16
    grid = [(1, 4096), (16, 4096), (64, 16384)] if quick else DECODE_GRID
    free = torch.cuda.mem_get_info()[0]
    bar = _progress(len(grid), "decode")
    # The timer's floor: one near-empty kernel (a 1-element add) between the events, after the flush.
    tiny = torch.zeros(1, device="cuda")
    launch_ms = timer(lambda: tiny.add_(1))
    for B, S in grid:
        kv_bytes = 2 * B * S * D * 2
        if 3 * kv_bytes > 0.6 * free:  # cache + SDPA's expanded copy must fit
            skipped.append(dict(impl="*", B=B, S=S, why=f"K/V of {kv_bytes / 2**30:.1f} GiB does not fit"))
            bar.update()
            continue
        gen = torch.Generator(device="cuda").manual_seed(B * S)
        q = torch.randn(B, H, 1, D, device="cuda", dtype=dtype, generator=gen)
        k = torch.randn(B, 1, S, D, device="cuda", dtype=dtype, generator=gen)
        v = torch.randn(B, 1, S, D, device="cuda", dtype=dtype, generator=gen)
        lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
        kd, vd = torch.empty_like(k), torch.empty_like(v)
        # one copy kernel of K alone (copy1): reads and writes as many DRAM bytes as a decode reads
        fns = {"copy": lambda: (kd.copy_(k), vd.copy_(v)), "copy1": lambda: kd.copy_(k)}
        ours, keep = [], []
        for kern in registry.in_suite("decode"):
            if kern.supports(dtype, D, False, 1) is not None:
                continue
            fns[kern.name] = kern.prepare(q, k, v, cache_seqlens=lens)[0]
            ours.append((kern.name, {}))
            if kern.paged:  # the same cache in shuffled pages of PAGE_SIZE keys (fastmqa.paged)
                from .paged import from_dense
                n = B * -(-S // PAGE_SIZE)
                pages = torch.randperm(n, generator=torch.Generator().manual_seed(B * S)).tolist()
                kp, vp, table = from_dense(k, v, lens.cpu(), PAGE_SIZE, pages=pages)
                keep += [kp, vp]
                fns[kern.name + ".paged"] = kern.prepare_paged(q, kp, vp, table.to(q.device), lens)[0]
                ours.append((kern.name + ".paged", dict(page_size=PAGE_SIZE)))
        theirs = []
        for impl, fn in torch_paths(small=False).items():
            why = _first_working(fn, q, k, v, False)
            if why:
                skipped.append(dict(impl=impl, B=B, S=S, why=why))
                continue
            fns[impl] = lambda fn=fn: fn(q, k, v, False)
            theirs.append(impl)
        # small points: more repetitions (their spread is a few % of a ~10 us call)
        t = timer.side_by_side(fns, reps=max(timer.reps, 60) if kv_bytes < 64 * 2**20 else None)
        med = {n: statistics.median(x) for n, x in t.items()}
        extra = dict(copy_ms=round(med["copy"], 5), copy1_ms=round(med["copy1"], 5), launch_ms=round(launch_ms, 5),
                     kv_bytes=kv_bytes)
        best = min(theirs, key=med.get) if theirs else None
        for name, more in ours:
            if best:
                more = more | dict(x_sdpa=[round(x, 4) for x in paired_ratio(t[best], t[name]).values()], vs=best)
            rows.append(_row(name, "decode", dtype, B, H, 1, S, D, False, med[name],
                             gbps=round(kv_bytes / med[name] / 1e6, 1), **more, **extra))
        for impl in theirs:
            rows.append(_row(impl, "decode", dtype, B, H, 1, S, D, False, med[impl],
                             gbps=round(kv_bytes / med[impl] / 1e6, 1), **extra))
        del fns, keep
        for kern in registry.in_suite("decode"):
            if (kern.supports(dtype, D, False, 1) is None and kern.workspace is not None
                    and (B, S) in ((1, 4096), (1, 32768), (16, 4096))):
                for ns in (1, 2, 4, 8, 16, 32, 64, 128):  # the split-count sweep
                    ms = timer(kern.prepare(q, k, v, cache_seqlens=lens, num_splits=ns)[0])
                    rows.append(_row(kern.name, "decode", dtype, B, H, 1, S, D, False, ms,
                                     gbps=round(kv_bytes / ms / 1e6, 1), num_splits=ns, sweep=True, **extra))
        del q, k, v, kd, vd
        bar.update()
    bar.close()
    return rows, skipped


def suite_backward(timer, quick=False):
    """Attention backward alone (bf16, H=32, B*S = 16384, D 128 and 64, causal and not): the
    registry's backward kernels against FastMQA's torch backward (the same algorithm) and
    PyTorch SDPA's backward per backend (FLASH with enable_gqa; cuDNN and EFFICIENT with
    expanded K/V, whose backward also sums dK, dV over the heads). The forward is run once,
    outside the timed region. tflops counts 2.5x the forward's flops (5 matmuls to its 2)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from . import ops
    from .build import backward_name
    rows, skipped = [], []
    ours = [k for k in registry.REGISTRY if k.backward]
    seqs = [512, 2048] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    pts = [(torch.bfloat16, 16384 // s, 32, s, D, c) for D in (128, 64) for c in (False, True) for s in seqs]
    bar = _progress(len(pts), "backward")
    backends = {"torch.sdpa_flash": (SDPBackend.FLASH_ATTENTION, False),
                "torch.sdpa_cudnn": (SDPBackend.CUDNN_ATTENTION, True),
                "torch.sdpa_efficient": (SDPBackend.EFFICIENT_ATTENTION, True)}

    def row(impl, ms, *args):
        r = _row(impl, "prefill", *args, ms, **{"pass": "bwd"})
        r["tflops"] = round(2.5 * r["tflops"], 3)
        return r

    for dtype, B, H, S, D, causal in pts:
        gen = torch.Generator(device="cuda").manual_seed(S)
        q, k, v, dout = (torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
                         for shape in ((B, H, S, D), (B, 1, S, D), (B, 1, S, D), (B, H, S, D)))
        point = (dtype, B, H, S, S, D, causal)
        torch_done = False
        for kern in ours:
            if kern.supports(dtype, D, causal) is not None:
                continue
            o, lse = kern(q, k, v, causal=causal, return_lse=True)
            launch = kern.prepare_backward(dout, q, k, v, o, lse, causal=causal)[0]
            rows.append(row(backward_name(kern), timer(launch), *point))
            if not torch_done and B * H * S * S * 4 <= 2**33:  # torch's holds blocks of fp32 scores
                torch_done = True
                scale = 1.0 / D ** 0.5
                fn = lambda: ops.mqa_bwd_impl(dout, q, k.view(B, S, D), v.view(B, S, D), o, lse, None, causal, scale)
                prev, ops.BACKWARD = ops.BACKWARD, "torch"
                try:
                    rows.append(row("fastmqa.torch_bwd", timer(fn), *point))
                finally:
                    ops.BACKWARD = prev
            del o, lse
        for impl, (backend, expanded) in backends.items():
            try:
                qq = q.detach().requires_grad_()
                kk, vv = k.detach().requires_grad_(), v.detach().requires_grad_()
                with sdpa_kernel([backend]):
                    ka, va = (kk.expand(-1, H, -1, -1), vv.expand(-1, H, -1, -1)) if expanded else (kk, vv)
                    out = torch.nn.functional.scaled_dot_product_attention(qq, ka, va, is_causal=causal,
                                                                           enable_gqa=not expanded)
                    fn = lambda: torch.autograd.grad(out, (qq, kk, vv), dout, retain_graph=True)
                    fn()
                    torch.cuda.synchronize()
                    rows.append(row(impl, timer(fn), *point))
                del out
            except Exception as e:  # a backend that refuses this shape
                skipped.append(dict(impl=impl, S=S, D=D, causal=causal, why=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
        del q, k, v, dout
        bar.update()
    bar.close()
    return rows, skipped


def run_suite(suite, quick=False, results_dir=None, timer=None, ceilings=None):
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)} or 'all'")
    timer = timer or Timer()
    ceilings = ceilings or measure_ceilings(timer)
    if suite in ("fp32", "prefill"):
        rows, skipped = suite_prefill(suite, timer, quick)
    elif suite == "decode":
        rows, skipped = suite_decode(timer, quick)
    elif suite == "backward":
        rows, skipped = suite_backward(timer, quick)
    else:
        from .bench_layer import suite_layer
        rows, skipped = suite_layer(timer, quick=quick)
    data = {"suite": suite, **environment(), "ceilings": ceilings, "quick": quick, "rows": rows, "skipped": skipped}
    if suite == "fp32":
        data["other_gpu"] = OTHER_GPU
    return write_results(suite, data, results_dir)


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"device": torch.cuda.get_device_name(0), "sm_count": props.multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastmqa.bench", description=__doc__.split("\n")[0])
    ap.add_argument("suites", nargs="+", metavar="SUITE", help=f"one or more of {', '.join(SUITES)}, or 'all'")
    ap.add_argument("--quick", action="store_true", help="a few points per suite (smoke run)")
    ap.add_argument("--results", default=None, help="directory for SUITE.json (default: results/)")
    args = ap.parse_args(argv)
    suites = list(SUITES) if args.suites == ["all"] else args.suites
    for s in suites:
        if s not in SUITES:
            ap.error(f"unknown suite {s!r}; choose from {', '.join(SUITES)} or 'all'")
    if not torch.cuda.is_available():
        print("fastmqa.bench: no CUDA GPU here (torch.cuda.is_available() is False). Benchmarks run on a GPU "
              "host; on this machine read the committed results/*.json instead.", file=sys.stderr)
        return 2
    from .build import build_all
    errs = {n: e for n, e in build_all(registry.REGISTRY).items() if e is not None}
    if errs:
        for n, e in errs.items():
            print(f"build of {n} failed: {e}", file=sys.stderr)
        return 1
    timer = Timer()
    ceilings = measure_ceilings(timer)
    print("ceilings:", ceilings, flush=True)
    for s in suites:
        t0 = time.time()
        p = run_suite(s, quick=args.quick, results_dir=args.results, timer=timer, ceilings=ceilings)
        print(f"{s}: wrote {p} in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
