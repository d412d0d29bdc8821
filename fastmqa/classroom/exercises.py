"""The registry of graded exercises: per label, what the student's cell defines and how it is checked.

Adding a chapter's exercise is one `Exercise(...)` entry in EXERCISES below:

    Exercise("ex-03-padding", "03_smem", "Pad the K tile to remove bank conflicts",
             name="mqa_smem_padded", check=AttentionCheck(causal=(False, True))),

`name` is the callable the exercise cell defines (for a kernel exercise: the runner that
launches the student's numba.cuda kernel, with the reference's signature
`fn(q, k, v, causal=False, scale=None) -> (B, H, Sq, D)`). The grader runs the check inside
the student's kernel after their cells: on the CPU in numba's simulator (tiny shapes), on the
GPU when there is one (more and larger shapes). Inputs are CPU tensors (a numba runner copies
them to the device) unless a check asks for device tensors. Every output is
compared with the float64 reference by `fastmqa.check` (error <= 2 x PyTorch's own
same-dtype error + floor; never loosened here).
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class CaseResult:
    name: str
    ok: bool
    detail: str = ""
    not_attempted: bool = False


@dataclass
class Context:
    device: str          # "cpu" (simulator) or "cuda"
    simulated: bool


# -- checks ------------------------------------------------------------------------------

def _shape_name(B, H, Sq, Skv, D, causal):
    return f"B={B} H={H} Sq={Sq} Skv={Skv} D={D} causal={causal}"


def _run_case(name, thunk) -> CaseResult:
    try:
        return thunk()
    except NotImplementedError as e:
        return CaseResult(name, False, f"not attempted: NotImplementedError({e})", not_attempted=True)
    except Exception as e:  # the student's code failed: say where, briefly
        tb = traceback.extract_tb(e.__traceback__)
        at = next((f"{f.name}, line {f.lineno}" for f in reversed(tb)
                   if f.filename.startswith("<ipython-input") or f.filename.startswith("/tmp/ipykernel")), None)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return CaseResult(name, False, f"raised {type(e).__name__}: {msg}" + (f" (in {at})" if at else ""))


def _tensor_or_error(name, out, want_shape):
    if not isinstance(out, torch.Tensor):
        return CaseResult(name, False, f"returned {type(out).__name__}, expected a tensor of shape {want_shape}")
    if tuple(out.shape) != tuple(want_shape):
        return CaseResult(name, False, f"returned shape {tuple(out.shape)}, expected {tuple(want_shape)}")
    return None


@dataclass(frozen=True)
class AttentionCheck:
    """fn(q, k, v, causal=..., scale=None) against fastmqa.check.compare over a shape grid.

    Shapes are (B, H, Sq, Skv, D); k, v are passed as (B, Skv, D) (the shared MQA head).
    The default grids include Sq != Skv (alignment), Sq > Skv (fully masked rows under
    causal: zeros expected) and a single-query (decode) row.
    """
    causal: tuple = (False, True)
    shapes_sim: tuple = ((1, 2, 4, 4, 8), (2, 3, 5, 7, 8), (1, 2, 7, 5, 16), (1, 2, 3, 9, 8))
    shapes_gpu: tuple = ((1, 2, 4, 4, 8), (2, 3, 5, 7, 8), (1, 2, 7, 5, 16), (1, 2, 3, 9, 8),
                         (2, 4, 64, 96, 64), (1, 8, 128, 128, 128), (2, 8, 1, 300, 64))
    kv_3d: bool = True
    # "host": CPU tensors in every mode (a numba runner copies them to the device itself);
    # "device": tensors on ctx.device (CUDA on a GPU), for exercises that call torch kernels.
    tensors: str = "host"

    def __call__(self, fn, ctx: Context) -> list[CaseResult]:
        from ..check import compare
        device = ctx.device if self.tensors == "device" else "cpu"
        results = []
        shapes = self.shapes_sim if ctx.simulated else self.shapes_gpu
        for (B, H, Sq, Skv, D) in shapes:
            for causal in self.causal:
                name = _shape_name(B, H, Sq, Skv, D, causal)

                def case(B=B, H=H, Sq=Sq, Skv=Skv, D=D, causal=causal, name=name):
                    g = torch.Generator().manual_seed(1000 * Sq + Skv + (1 if causal else 0))
                    q = torch.randn(B, H, Sq, D, generator=g)
                    kv = (B, Skv, D) if self.kv_3d else (B, 1, Skv, D)
                    k, v = torch.randn(*kv, generator=g), torch.randn(*kv, generator=g)
                    q, k, v = (t.to(device) for t in (q, k, v))
                    out = fn(q, k, v, causal=causal)
                    bad = _tensor_or_error(name, out, (B, H, Sq, D))
                    if bad:
                        return bad
                    r = compare(out, q, k, v, causal=causal)
                    if r.ok:
                        return CaseResult(name, True, f"max err {r.max_err:.1e} <= tol {r.tol:.1e}")
                    if r.nan:
                        return CaseResult(name, False, "output has NaN")
                    return CaseResult(name, False, f"max err {r.max_err:.2e} > tol {r.tol:.2e} "
                                                   f"(2 x torch err {r.torch_err:.1e} + floor); worst at "
                                                   f"(b, h, i, d) = {r.where}")
                results.append(_run_case(name, case))
        return results


def compare_tensors(out, ref64, torch_out, dtype=torch.float32):
    """The tolerance rule of fastmqa.check for any tensor: (ok, max_err, tol, where, nan)."""
    from ..check import ATOL, MULTIPLE
    out64 = out.detach().double().cpu()
    nan = bool(torch.isnan(out64).any() or torch.isinf(out64).any())
    diff = (out64 - ref64).abs()
    max_err = float(diff.max()) if diff.numel() else 0.0
    torch_err = float((torch_out.detach().double().cpu() - ref64).abs().max()) if diff.numel() else 0.0
    tol = MULTIPLE * torch_err + ATOL.get(dtype, 1e-6)
    where = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0]) if diff.numel() and not nan else None
    return (not nan) and max_err <= tol, max_err, tol, where, nan


@dataclass(frozen=True)
class SoftmaxCheck:
    """fn(x) -> softmax over the last axis of a 2-D float32 tensor, against fp64 torch.softmax."""
    shapes: tuple = ((1, 5), (3, 17), (4, 64), (2, 130))
    scales: tuple = (1.0, 60.0)   # 60: logits around +-200, where exp overflows without the max

    def __call__(self, fn, ctx: Context) -> list[CaseResult]:
        results = []
        for (R, C) in self.shapes:
            for s in self.scales:
                name = f"rows={R} cols={C} logits x{s:g}"

                def case(R=R, C=C, s=s, name=name):
                    g = torch.Generator().manual_seed(R * 1000 + C)
                    x = torch.randn(R, C, generator=g) * s   # host tensor: the runner copies it
                    out = fn(x)
                    bad = _tensor_or_error(name, out, (R, C))
                    if bad:
                        return bad
                    ref = torch.softmax(x.double().cpu(), dim=-1)
                    ok, err, tol, where, nan = compare_tensors(out, ref, torch.softmax(x, dim=-1))
                    if ok:
                        return CaseResult(name, True, f"max err {err:.1e} <= tol {tol:.1e}")
                    if nan:
                        return CaseResult(name, False, "output has NaN or inf (does exp overflow? subtract "
                                                       "the row max first)")
                    return CaseResult(name, False, f"max err {err:.2e} > tol {tol:.2e}; worst at (row, col) = {where}")
                results.append(_run_case(name, case))
        return results


@dataclass(frozen=True)
class FunctionCheck:
    """Any other check: `fn_check(fn, ctx) -> list[CaseResult]` (use _run_case per case)."""
    fn_check: Callable

    def __call__(self, fn, ctx):
        return self.fn_check(fn, ctx)


# -- chapters 09 (layer) and 10 (MLA): checks of their kernel exercises --------------------

def _rule_case(name, out, ref64, torch_out, axes):
    """CaseResult of the tolerance rule for out vs ref64 (shape first); `axes` names the worst index."""
    bad = _tensor_or_error(name, out, tuple(ref64.shape))
    if bad:
        return bad
    ok, err, tol, where, nan = compare_tensors(out, ref64, torch_out)
    if ok:
        return CaseResult(name, True, f"max err {err:.1e} <= tol {tol:.1e}")
    return CaseResult(name, False, "output has NaN or inf" if nan else
                      f"max err {err:.2e} > tol {tol:.2e}; worst at {axes} = {where}")


def _check_mqa_dv(fn, ctx, shapes=((1, 2, 4, 4, 8), (2, 3, 5, 7, 8), (1, 2, 7, 5, 8))):
    """fn(q, k, dout, lse, causal=...) -> dV (B, Skv, D) of MQA, vs the fp64 autograd of the reference."""
    from ..ops import mqa_attention
    from ..reference import attention_ref
    results = []
    for (B, H, Sq, Skv, D) in shapes:
        for causal in (False, True):
            name = _shape_name(B, H, Sq, Skv, D, causal)

            def case(B=B, H=H, Sq=Sq, Skv=Skv, D=D, causal=causal, name=name):
                g = torch.Generator().manual_seed(100 * Sq + Skv)
                q, dout = torch.randn(B, H, Sq, D, generator=g), torch.randn(B, H, Sq, D, generator=g)
                k, v = torch.randn(B, Skv, D, generator=g), torch.randn(B, Skv, D, generator=g)
                lse = mqa_attention(q, k, v, causal=causal, return_lse=True)[1]

                def dv(dtype):
                    vv = v.to(dtype).requires_grad_()
                    attention_ref(q.to(dtype), k.to(dtype), vv, causal=causal).backward(dout.to(dtype))
                    return vv.grad
                out = fn(q, k, dout, lse, causal=causal)
                return _rule_case(name, out, dv(torch.float64).reshape(B, Skv, D), dv(torch.float32), "(b, j, d)")
            results.append(_run_case(name, case))
    return results


def _check_mla_decode(fn, ctx, shapes=((2, 3, 9, 8, 4, (9, 4)), (1, 4, 6, 16, 0, (6,)), (3, 2, 5, 8, 8, (5, 0, 1)))):
    """fn(q, cache, cache_seqlens, kv_lora_rank, scale=...) -> (B, H, r): one decode row per head over
    the latent cache, value = the first r columns; vs the fp64 reference with seqlens."""
    from ..reference import attention_ref
    results = []
    for (B, H, S, r, dr, lens) in shapes:
        name = f"B={B} H={H} Smax={S} r={r} rope={dr} lengths={list(lens)}"

        def case(B=B, H=H, S=S, r=r, dr=dr, lens=lens, name=name):
            g = torch.Generator().manual_seed(10 * S + r)
            q, cache = torch.randn(B, H, r + dr, generator=g), torch.randn(B, S, r + dr, generator=g)
            seqlens = torch.tensor(lens, dtype=torch.int32)
            ref = lambda t: attention_ref(q.to(t)[:, :, None], cache.to(t), cache.to(t), scale=0.2,
                                          seqlens=seqlens)[:, :, 0, :r]
            out = fn(q, cache, seqlens, r, scale=0.2)
            return _rule_case(name, out, ref(torch.float64), ref(torch.float32), "(b, h, c)")
        results.append(_run_case(name, case))
    return results


# -- the registry -------------------------------------------------------------------------



# -- chapters 01 (expand K/V) and 11 (mean-pool K/V heads): exact-function checks -----------

def _check_expand_kv(fn, ctx, shapes=((1, 4, 5, 8), (2, 3, 7, 16), (2, 8, 1, 8))):
    results = []
    for (B, H, S, D) in shapes:
        name = f"B={B} H={H} S={S} D={D}"

        def case(B=B, H=H, S=S, D=D, name=name):
            g = torch.Generator().manual_seed(B * 100 + H * 10 + S)
            k = torch.randn(B, 1, S, D, generator=g)
            out = fn(k, H)
            bad = _tensor_or_error(name, out, (B, H, S, D))
            if bad:
                return bad
            want = k.expand(B, H, S, D)
            if torch.equal(out.cpu(), want):
                return CaseResult(name, True, "equal to k.expand(B, H, S, D)")
            where = tuple(int(i) for i in torch.nonzero(out.cpu() != want)[0])
            return CaseResult(name, False, f"differs from k.expand at (b, h, s, d) = {where}")
        results.append(_run_case(name, case))
    return results


def check_tile_layout(fn, ctx=None, dims=(64, 128), keys=64):
    """fn(r, ch, D) -> byte offset in shared memory of 16-byte chunk ch of key r of a (keys, D) bf16
    tile (10_decode's K/V tiles). Graded, for every head dim: the chunks do not overlap and fit in
    [0, keys * (D + 8) * 2) (padding of up to 16 bytes a key is allowed); the 8 chunks of every 128-byte segment of a cache row land in one aligned
    128-byte segment of shared memory (a whole-line cp.async); and the keys 8n + c (n = 0..7) at one
    chunk, which one ldmatrix reads, sit in 8 different 16-byte bank groups."""
    results = []
    for D in dims:
        name = f"D={D} keys={keys}"

        def case(D=D, name=name):
            CH, size = D // 8, keys * (D + 8) * 2
            off = {(r, ch): int(fn(r, ch, D)) for r in range(keys) for ch in range(CH)}
            bad = [(rc, o) for rc, o in off.items() if o % 16 or not 0 <= o < size]
            if bad:
                return CaseResult(name, False, f"chunk (key, chunk) = {bad[0][0]} at byte {bad[0][1]}: "
                                               f"must be a multiple of 16 in [0, {size})")
            if len(set(off.values())) != len(off):
                return CaseResult(name, False, "two chunks share an address")
            split = [(r, g) for r in range(keys) for g in range(CH // 8)
                     if len({off[r, 8 * g + c] // 128 for c in range(8)}) > 1]
            if split:
                return CaseResult(name, False, f"{len(split)} of {keys * CH // 8} 128-byte row segments land across "
                                               f"two 128-byte shared-memory segments, e.g. key {split[0][0]}, "
                                               f"chunks {8 * split[0][1]}..{8 * split[0][1] + 7}")
            for c in range(8):
                for x in range(CH):
                    groups = [off[8 * n + c, x] // 16 % 8 for n in range(keys // 8)]
                    if len(set(groups)) < len(groups):
                        return CaseResult(name, False, f"keys {c}, {c + 8}, ... at chunk {x}: bank groups {groups} "
                                                       "repeat (an ldmatrix bank conflict)")
            return CaseResult(name, True, "whole 128-byte segments, conflict-free ldmatrix")
        results.append(_run_case(name, case))
    return results


def _simulate_ring(fn, nstage, n_tiles, consumers, pick):
    """Run 08_flash_wgmma's stage ring with `fn(u, nstage) -> (stage, full_parity, empty_parity)`
    driving one producer and `consumers` consumers, the next step of whom `pick(runnable)` chooses.
    mbarriers as on the GPU: a wait for parity p passes once the phase of parity p has completed,
    i.e. while the barrier's completed-phase count has the other parity (so a wait on a fresh
    barrier passes for p = 1); a full barrier completes when the producer fills its stage, an
    empty one when every consumer has released it. None if the run is clean, else what broke."""
    full, empty, arrivals = [0] * nstage, [0] * nstage, [0] * nstage
    tile, readers = [None] * nstage, [0] * nstage
    nxt = {"producer": 0, **{f"consumer {c}": 0 for c in range(consumers)}}

    def ring(u):
        r = fn(u, nstage)
        if not (isinstance(r, tuple) and len(r) == 3):
            raise TypeError(f"ring_waits({u}, {nstage}) must return (stage, full_parity, empty_parity), got {r!r}")
        st, fp, ep = r
        if not (isinstance(st, int) and 0 <= st < nstage and fp in (0, 1) and ep in (None, 0, 1)):
            raise ValueError(f"ring_waits({u}, {nstage}) = {r!r}: stage in 0..{nstage - 1}, parities 0 or 1 "
                             "(the empty parity may be None)")
        return int(st), int(fp), ep

    def passes(done, p):
        return p is None or (done & 1) != p

    def runnable(who):
        u = nxt[who]
        if u >= n_tiles:
            return False
        st, fp, ep = ring(u)
        return passes(empty[st], ep) if who == "producer" else passes(full[st], fp)

    while True:
        ready = [w for w in nxt if runnable(w)]
        if not ready:
            if all(u >= n_tiles for u in nxt.values()):
                return None
            waiting = ", ".join(f"{w} at tile {u}" for w, u in nxt.items() if u < n_tiles)
            return f"deadlock: nobody can go on ({waiting})"
        who = pick(ready)
        u = nxt[who]
        st, fp, ep = ring(u)
        if who == "producer":
            if readers[st]:
                return (f"the producer refilled stage {st} with tile {u} while {readers[st]} consumer(s) still "
                        f"had tile {tile[st]} to read")
            tile[st], readers[st] = u, consumers
            full[st] += 1
        else:
            if tile[st] != u or readers[st] == 0:
                return (f"{who} passed the full barrier of stage {st} (parity {fp}) for tile {u}, but the stage "
                        f"held {'nothing yet' if tile[st] is None else f'tile {tile[st]}'}")
            readers[st] -= 1
            arrivals[st] += 1
            if arrivals[st] == consumers:
                arrivals[st] = 0
                empty[st] += 1
        nxt[who] = u + 1


def check_stage_ring(fn, ctx=None, stages=(1, 2, 3), consumer_counts=(1, 2), seeds=12):
    """fn(u, nstage) -> (stage, full_parity, empty_parity) of the u-th tile a block streams through
    a ring of nstage stages (08_flash_wgmma's warp-specialised kernel): graded by running the ring
    (`_simulate_ring`) under the producer-first and consumers-first schedules and `seeds` random
    ones: no consumer reads a stage before its tile is in, no refill before every consumer has
    released the stage, no deadlock."""
    import random
    results = []
    for nstage in stages:
        for consumers in consumer_counts:
            name = f"{nstage} stage(s), {consumers} consumer(s)"

            def case(nstage=nstage, consumers=consumers, name=name):
                n_tiles = 3 * nstage + 2
                picks = [("producer first", lambda r: r[0]), ("consumers first", lambda r: r[-1])]
                for seed in range(seeds):
                    rng = random.Random(seed)
                    picks.append((f"random schedule {seed}", lambda r, rng=rng: rng.choice(r)))
                for what, pick in picks:
                    why = _simulate_ring(fn, nstage, n_tiles, consumers, pick)
                    if why:
                        return CaseResult(name, False, f"{what}: {why}")
                return CaseResult(name, True, f"{n_tiles} tiles under {len(picks)} schedules")
            results.append(_run_case(name, case))
    return results


class _CountingInt(int):
    """An int that counts the divisions and remainders taken by it (`check_item_walk`)."""

    def __new__(cls, value, counter):
        obj = super().__new__(cls, value)
        obj.counter = counter
        return obj

    def _count(self, n=1):
        self.counter[0] += n

    def __rfloordiv__(self, other):
        self._count()
        return int(other) // int(self)

    def __rmod__(self, other):
        self._count()
        return int(other) % int(self)

    def __rdivmod__(self, other):
        self._count(2)
        return divmod(int(other), int(self))

    def __floordiv__(self, other):
        self._count()
        return int(self) // int(other)

    def __mod__(self, other):
        self._count()
        return int(self) % int(other)

    def __rtruediv__(self, other):
        self._count()
        return int(other) / int(self)


def check_item_walk(fn, ctx=None, grids=((32, 128, 4, 132), (3, 7, 1, 5), (5, 30, 64, 132), (1, 10, 8, 4),
                                         (7, 9, 2, 7), (4, 33, 16, 13))):
    """fn(w0, dw, B, nmb, P) -> [(b, mb, i_first)] of the items w0, w0 + dw, ... < B * nmb one
    persistent block of 08's warp-specialised kernel walks (item w: sequence w % B, row block
    nmb - 1 - w // B, first position mb * P), graded against that definition for a few blocks of
    each grid (B, nmb, P, grid size), with B passed as an int that counts the divisions and
    remainders taken by it: at most 4 a call, whatever the number of items."""
    results = []
    for (B, nmb, P, grid) in grids:
        name = f"B={B} row blocks={nmb} P={P} grid={grid}"

        def case(B=B, nmb=nmb, P=P, grid=grid, name=name):
            n_items = B * nmb
            for w0 in sorted({0, 1, grid // 2, grid - 1} & set(range(min(grid, n_items)))):
                want = [(w % B, nmb - 1 - w // B, (nmb - 1 - w // B) * P) for w in range(w0, n_items, grid)]
                counter = [0]
                got = fn(w0, grid, _CountingInt(B, counter), nmb, P)
                got = [tuple(int(x) for x in item) for item in got] if isinstance(got, (list, tuple)) else got
                if got != want:
                    if not isinstance(got, list) or len(got) != len(want):
                        return CaseResult(name, False, f"block {w0}: {len(want)} items expected, got "
                                                       f"{len(got) if isinstance(got, list) else type(got).__name__}")
                    k = next(i for i, (a, b_) in enumerate(zip(got, want)) if a != b_)
                    return CaseResult(name, False, f"block {w0}, item {k} (w = {w0 + k * grid}): got {got[k]}, "
                                                   f"want {want[k]}")
                if counter[0] > 4:
                    return CaseResult(name, False, f"block {w0}: {counter[0]} divisions or remainders by B for "
                                                   f"{len(want)} items (at most 4 a call: divide before the loop)")
            return CaseResult(name, True, f"{n_items} items over {grid} blocks, at most 4 divisions a block")
        results.append(_run_case(name, case))
    return results


def _check_meanpool(fn, ctx, shapes=((4, 8, 16), (12, 32, 384), (1, 5, 7))):
    results = []
    for (H, d, hidden) in shapes:
        name = f"H={H} head_dim={d} hidden={hidden}"

        def case(H=H, d=d, hidden=hidden, name=name):
            g = torch.Generator().manual_seed(H * d + hidden)
            w = torch.randn(H * d, hidden, generator=g)
            out = fn(w, H)
            ref64 = w.double().view(H, d, hidden).mean(0)
            return _rule_case(name, out, ref64, w.view(H, d, hidden).mean(0), "(row, col)")
        results.append(_run_case(name, case))
    return results

@dataclass(frozen=True)
class Exercise:
    label: str                 # the {exercise}'s :label: and the cell's '# EXERCISE <label>'
    chapter: str               # notebook stem: "02_naive"
    title: str
    name: str                  # the callable the exercise cell defines
    check: Callable            # (fn, Context) -> list[CaseResult]
    points: float = 1.0
    hint: str = ""             # shown when a case fails
    extra: dict = field(default_factory=dict)


_CAUSAL_HINT = ("causal masking is bottom-right aligned: query i of Sq sees key j of Skv iff "
                "j <= i + (Skv - Sq); a row that sees no key gives zeros")

EXERCISES: list[Exercise] = [
    # --- the fixture of tests/test_classroom.py (tests/fixtures/classroom_fixture.ipynb) -----
    Exercise("ex-fixture-causal", "classroom_fixture", "Make the naive prototype causal",
             name="mqa_naive_causal", check=AttentionCheck(causal=(True,)), hint=_CAUSAL_HINT),
    Exercise("ex-fixture-softmax", "classroom_fixture", "A numba kernel for row-wise softmax",
             name="softmax_rows", check=SoftmaxCheck(),
             hint="one thread per row: max, then sum of exp(x - max), then divide"),
    # --- chapters ----------------------------------------------------------------------------
    Exercise("ex-00-softmax", "00_setup", "A numba kernel for row-wise softmax",
             name="softmax_rows", check=SoftmaxCheck(),
             hint="one thread per row: the row max first, then the sum of exp(x - max), then divide"),
    Exercise("ex-01-expand", "01_mqa", "Expand MQA's K/V to H heads, as SDPA's expanded path must",
             name="expand_kv", check=FunctionCheck(_check_expand_kv),
             hint="one thread per output element (b, h, s, d) reads k[b, 0, s, d]: the same value for every h"),
    Exercise("ex-02-per-element", "02_naive", "One thread per output element (b, h, i, d)",
             name="mqa_per_element", check=AttentionCheck(causal=(False, True)),
             hint="thread t owns d = t % D of row t // D; recompute the row's max and sum, accumulate p * v[b, j, d]"),
    Exercise("ex-03-hmajor", "03_smem", "Pack the rows h-major",
             name="mqa_smem_hmajor", check=AttentionCheck(causal=(False, True)),
             hint="row = h * Sq + i; the block's key range is set by its largest i, which is Sq - 1 "
                  "when its rows cross the end of a head"),
    Exercise("ex-04-warp-softmax", "04_warp", "Softmax with one warp per row",
             name="softmax_rows_warp", check=SoftmaxCheck(),
             hint="lane l visits columns l, l + 32, ...; max and sum are 5-step butterflies of "
                  "cuda.shfl_xor_sync with offsets 16, 8, 4, 2, 1"),
    Exercise("ex-05-block-softmax", "05_cublas", "A block per score row",
             name="mqa_cublas_block", check=AttentionCheck(causal=(False, True)), hint=_CAUSAL_HINT
             + "; merge (max, sum) pairs as l_a * exp(m_a - m) + l_b * exp(m_b - m), skipping empty ones"),
    Exercise("ex-06-stream", "06_flash_fp32", "The online softmax one key at a time",
             name="mqa_flash_stream", check=AttentionCheck(causal=(False, True)), hint=_CAUSAL_HINT
             + "; per key: m_new = max(m, s), alpha = exp(m - m_new), l = l * alpha + exp(s - m_new), "
               "acc = acc * alpha + exp(s - m_new) * v_j"),
    Exercise("ex-07-double-buffer", "07_tensor_cores", "Double-buffer the K/V tiles",
             name="mqa_flash_db", check=AttentionCheck(causal=(False, True)),
             hint="tile t lives in buffer t % 2; after the barrier at the top of tile t, copy tile t + 1 "
                  "(keys (t + 1) * BN + r, zeros past Skv) into buffer 1 - t % 2"),
    Exercise("ex-07-ring", "07_tensor_cores", "The stage ring's barrier phases",
             name="ring_waits", check=FunctionCheck(check_stage_ring),
             hint="tile u sits in stage u % nstage and is that stage's (u // nstage)-th fill: consumers wait "
                  "for the parity of that count on the full barrier; the producer waits, from u = nstage on, "
                  "for the release of tile u - nstage, the previous fill's count, on the empty barrier"),
    Exercise("ex-07-walk", "07_tensor_cores", "Walk the items without dividing",
             name="item_walk", check=FunctionCheck(check_item_walk),
             hint="divide w0 and the grid stride dw by B once each, before the loop; per item add the stride's "
                  "remainder to b and its quotient to w // B, and carry once when b reaches B"),
    Exercise("ex-08-splitkv", "08_decode", "Split-KV in two kernels: partials, then combine",
             name="mqa_splitkv", check=AttentionCheck(causal=(False, True)), hint=_CAUSAL_HINT
             + "; a split that sees no key has m = -inf and l = 0 and must add nothing when combined"),
    Exercise("ex-08-swizzle", "08_decode", "A tile layout for cp.async and ldmatrix",
             name="tile_offset", check=FunctionCheck(check_tile_layout),
             hint="keep key r's row at r * D * 2 bytes (rows are multiples of 128 bytes) and permute the 16-byte "
                  "chunks within each 128-byte segment by a function of r // 8, e.g. ch ^ (r // 8 % 8)"),
    Exercise("ex-09-dv", "09_layer", "The dV kernel of the MQA backward",
             name="mqa_dv", check=FunctionCheck(_check_mqa_dv),
             hint="thread (b, j, d) sums exp(scale * q_i . k_j - lse_i) * dout[b, h, i, d] over every head h "
                  "and every row i that sees key j (causal: j <= i + Skv - Sq)"),
    Exercise("ex-10-mla-decode", "10_mla", "An MLA decode kernel over the latent cache",
             name="mla_decode", check=FunctionCheck(_check_mla_decode),
             hint="one thread per (b, h): keys are the whole cache row (r + rope numbers), values its first r; "
                  "only the first cache_seqlens[b] rows count, and a sequence of length 0 gives zeros"),
    Exercise("ex-11-meanpool", "11_real_model", "Mean-pool the K/V heads in a kernel",
             name="meanpool_heads", check=FunctionCheck(_check_meanpool),
             hint="one thread per output element (row r of the pooled head, column c): average w[h * d + r, c] over h"),
]


def get(label: str) -> Exercise | None:
    for e in EXERCISES:
        if e.label == label:
            return e
    return None


def for_chapter(chapter: str) -> list[Exercise]:
    return [e for e in EXERCISES if e.chapter == chapter]


def _check_unique():
    seen = set()
    for e in EXERCISES:
        if e.label in seen:
            raise ValueError(f"exercise label {e.label!r} registered twice")
        seen.add(e.label)


_check_unique()
