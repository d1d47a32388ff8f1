"""Work over the rows of a batch in blocks, on every core the process may use.

A small shared thread pool (a new one in a forked child) plus the calling thread take blocks
of rows in turn until none is left. NumPy releases the GIL inside einsum, matmul and copies,
so large writes and products run in parallel; small ones stay on the calling thread.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

#: Below this much work (bytes written or read) the calling thread does it alone.
PARALLEL_MIN_BYTES = 4 * 2**20
_BLOCKS_PER_WORKER = 4  # smaller blocks even out the page-fault cost between threads
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (process id, workers, pool)
_pool_lock = threading.Lock()
_draining = threading.local()  # set while a thread works on blocks: nested calls run serially


def in_blocks(n: int, nbytes: int, write: Callable[[slice], Any],
              block_rows: int | None = None) -> None:
    """Call ``write(rows)`` over blocks of ``range(n)`` covering it once (of `block_rows`
    rows, or a few per core), in parallel when the work (`nbytes`) is large and the process
    may use more than one core; return when all are done.

    The calling thread works too, and every thread takes the next block when it is free, so
    a core that the framework's own threads still hold slows the write down least.
    """
    workers = _workers()
    parallel = (workers > 1 and nbytes >= PARALLEL_MIN_BYTES
                and not getattr(_draining, "active", False))
    default = -(-n // min(n, workers * _BLOCKS_PER_WORKER)) if parallel and n else n
    step = max(1, block_rows or default)
    if not parallel or n <= step:
        for start in range(0, n, step):
            write(slice(start, min(start + step, n)))
        return
    blocks = iter([slice(start, min(start + step, n)) for start in range(0, n, step)])
    lock = threading.Lock()

    def drain() -> None:
        _draining.active = True
        try:
            while True:
                with lock:
                    rows = next(blocks, None)
                if rows is None:
                    return
                write(rows)
        finally:
            _draining.active = False

    helpers = [_executor(workers - 1).submit(drain) for _ in range(workers - 1)]
    try:
        drain()
    finally:
        for helper in helpers:
            helper.result()  # waits for every block; re-raises a helper's error


def _workers() -> int:
    """The cores this process may run on (its CPU affinity), at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _executor(workers: int) -> ThreadPoolExecutor:
    """The shared pool; a new one in a forked child (the parent's threads are not there)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[:2] != (os.getpid(), workers):
            _pool = (os.getpid(), workers,
                     ThreadPoolExecutor(workers, thread_name_prefix="gradkit-rows"))
        return _pool[2]
