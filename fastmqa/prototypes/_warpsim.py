"""Warp shuffles for numba's CUDA simulator.

numba.cuda compiles `cuda.shfl_sync` / `cuda.shfl_xor_sync` (and the up/down variants) for a
real GPU, but its simulator (NUMBA_ENABLE_CUDASIM=1, which runs every CUDA thread as a Python
thread) does not provide them. `install()` adds them to the simulator, so a prototype that
uses warp shuffles runs unchanged on the CPU. On a GPU it does nothing.

How the simulated shuffle works: every thread of a block appends the value it offers to its
own list; its n-th shuffle then reads the n-th value its source lane offered, waiting (and
yielding the GIL) until that lane has got there. As on the GPU, every lane of a warp must
execute the same sequence of shuffles (a lane that never arrives is reported after a timeout
instead of hanging). Keep sizes tiny: a shuffle costs the simulator about a millisecond.

It also makes the simulator's block manager yield while it polls its threads. numba's
manager spins on the GIL checking whether every thread has reached `syncthreads`, which
starves the threads it waits for: each barrier (and each shuffle) then costs several
milliseconds. The replacement is numba's own loop plus one `time.sleep`, installed only when
numba's loop is exactly the one it was copied from (checked by a hash of its source), so a
newer numba keeps its own loop and is merely slower.
"""
from __future__ import annotations

import hashlib
import inspect
import threading
import time

from .. import sim

FULL_MASK = 0xFFFFFFFF
TIMEOUT_S = 60.0
_lock = threading.Lock()
_installed = False


def _slots(t):
    mgr = t._manager
    slots = getattr(mgr, "_fastmqa_shfl", None)
    if slots is None:
        with _lock:
            slots = getattr(mgr, "_fastmqa_shfl", None)
            if slots is None:
                n = 1
                for e in mgr._block_dim:
                    n *= int(e)
                slots = [[] for _ in range(n)]
                mgr._fastmqa_shfl = slots
    return slots


def _exchange(value, src_lane_of, width=32):
    t = threading.current_thread()
    slots = _slots(t)
    tid = t.thread_id
    mine = slots[tid]
    n = len(mine)
    mine.append(value)
    lane = tid % 32
    base = tid - lane + (lane // width) * width
    src_lane = src_lane_of(lane % width)
    if src_lane is None or not 0 <= src_lane < width:
        return value  # out of the segment: CUDA returns the caller's own value
    src = base + src_lane
    if src >= len(slots):
        return value  # a lane past the end of the block (blockDim not a multiple of 32)
    theirs = slots[src]
    start = time.monotonic()
    while len(theirs) <= n:
        if t.abort:
            raise RuntimeError("simulated shuffle aborted (another thread failed)")
        if time.monotonic() - start > TIMEOUT_S:
            raise RuntimeError(f"simulated warp shuffle: lane {src_lane} of thread {tid}'s warp never reached "
                               f"shuffle #{n + 1}; every lane of a warp must execute the same shuffles")
        time.sleep(0)  # let the other simulated threads run
    return theirs[n]


def _shfl_sync(self, mask, value, src_lane):
    return _exchange(value, lambda lane: int(src_lane) % 32)


def _shfl_xor_sync(self, mask, value, lane_mask):
    return _exchange(value, lambda lane: lane ^ int(lane_mask))


def _shfl_up_sync(self, mask, value, delta):
    return _exchange(value, lambda lane: lane - int(delta) if lane >= int(delta) else None)


def _shfl_down_sync(self, mask, value, delta):
    return _exchange(value, lambda lane: lane + int(delta))


def _syncwarp(self, mask=FULL_MASK):
    pass  # simulated lanes of a warp are already ordered by the shuffles they share


_NUMBA_RUN_SHA = "54626c6819f55d51"   # numba-cuda 0.30's BlockManager.run
POLL_SLEEP_S = 1e-5


def _polite_run(self, grid_point, *args):
    """numba-cuda 0.30's BlockManager.run with a sleep in its polling loop."""
    import numpy as np
    from numba.cuda.simulator.kernel import BlockThread
    threads, livethreads, blockedthreads = set(), set(), set()
    for block_point in np.ndindex(*self._block_dim):
        def target():
            self._f(*args)
        t = BlockThread(target, self, grid_point, block_point, self._debug)
        t.start()
        threads.add(t)
        livethreads.add(t)
    while livethreads:
        time.sleep(POLL_SLEEP_S)  # the one change: let the simulated threads have the GIL
        for t in livethreads:
            if t.syncthreads_blocked:
                blockedthreads.add(t)
            elif t.exception:
                for t_other in threads:
                    t_other.abort = True
                    t_other.syncthreads_blocked = False
                    t_other.syncthreads_event.set()
                raise t.exception[0].with_traceback(t.exception[1])
        if livethreads == blockedthreads:
            for t in blockedthreads:
                t.syncthreads_blocked = False
                t.syncthreads_event.set()
            blockedthreads = set()
        livethreads = set([t for t in livethreads if t.is_alive()])
    for t in threads:
        if t.exception:
            raise t.exception[0].with_traceback(t.exception[1])


def _speed_up_block_manager() -> bool:
    from numba.cuda.simulator import kernel
    run = kernel.BlockManager.run
    if run is _polite_run:
        return True
    try:
        sha = hashlib.sha256(inspect.getsource(run).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return False
    if sha != _NUMBA_RUN_SHA:
        return False
    kernel.BlockManager.run = _polite_run
    return True


def install() -> bool:
    """Give the simulator warp shuffles (idempotent). Returns True if the simulator is in use."""
    global _installed
    if not sim.simulated():
        return False
    if _installed:
        return True
    from numba.cuda.simulator import kernelapi
    fake = kernelapi.FakeCUDAModule
    for name, fn in (("shfl_sync", _shfl_sync), ("shfl_xor_sync", _shfl_xor_sync),
                     ("shfl_up_sync", _shfl_up_sync), ("shfl_down_sync", _shfl_down_sync),
                     ("syncwarp", _syncwarp)):
        if not hasattr(fake, name):
            setattr(fake, name, fn)
    _speed_up_block_manager()
    _installed = True
    return True
