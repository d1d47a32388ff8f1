"""Writing per-example gradient rows into the NumPy result, on every core.

A per-example result is B × P numbers in new memory: its cost is the write itself (page
faults and memory bandwidth), which one thread cannot saturate. So the rows of each variable
are written in blocks by a small pool of threads (NumPy releases the GIL inside einsum and
copies). A `Factor` (layer input, pre-activation gradient; see
``gradkit._backends._layer_factors``) is multiplied out straight into the result: ``a δᵀ``
written once, never formed elsewhere first.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from gradkit import _conv_rows as conv
from gradkit._backends._layer_factors import Factor

#: Below this many bytes a variable's rows are written by the calling thread alone.
PARALLEL_MIN_BYTES = 4 * 2**20
_BLOCKS_PER_WORKER = 4  # smaller blocks even out the page-fault cost between threads
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (process id, workers, pool)
_pool_lock = threading.Lock()


def write_rows(part: Any, out: np.ndarray, product: Callable | None = None) -> bool:
    """Write one variable's per-example gradients (an array or a `Factor`) into `out`.

    `product(inputs, deltas, out)`, when given, writes the kernel rows ``Σ_t a_t δ_tᵀ``
    instead of NumPy (an adapter whose framework keeps its own threads busy-waiting on every
    core, as torch's OpenMP does, writes them with those threads). Returns whether the rows
    are finite, from the small factors when a bound allows it.
    """
    n = out.shape[0]
    if not isinstance(part, Factor):
        rows = np.asarray(part)[:n].reshape(out.shape)
        in_blocks(n, out.nbytes, lambda s: np.copyto(out[s], rows[s]))
        return _finite(out)
    if part.geometry is not None:  # a convolution: small kernels, checked directly
        if part.role == "bias":
            np.sum(conv.bias_deltas(part.deltas, part.geometry)[:n], axis=1, out=out)
        else:
            conv.kernel_rows(np.asarray(part.inputs)[:n], np.asarray(part.deltas)[:n],
                             part.geometry, out)
        return _finite(out)
    deltas = np.asarray(part.deltas)[:n]
    inputs = None if part.role == "bias" else np.asarray(part.inputs)[:n]
    if part.role == "bias":
        np.sum(deltas, axis=1, out=out)
    elif part.role == "embeddings":  # δ_t added into row id_t
        out[...] = 0
        np.add.at(out, (np.arange(n)[:, None], inputs.astype(np.intp)), deltas)
    else:
        (product or kernel_rows)(inputs, deltas, out)
    return _factor_finite(part.role, inputs, deltas, out.dtype) or _finite(out)


def kernel_rows(inputs: np.ndarray, deltas: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = Σ_t a_it δ_itᵀ`` for inputs (n, T, in) and deltas (n, T, out), in blocks."""
    if inputs.shape[1] == 1:  # a_i δ_iᵀ, written once, straight into the result
        a, d = inputs[:, 0], deltas[:, 0]
        in_blocks(len(out), out.nbytes,
                  lambda s: np.einsum("bi,bo->bio", a[s], d[s], out=out[s]))
    else:
        a = inputs.transpose(0, 2, 1)
        in_blocks(len(out), out.nbytes, lambda s: np.matmul(a[s], deltas[s], out=out[s]))


def in_blocks(n: int, nbytes: int, write: Callable[[slice], Any]) -> None:
    """Call ``write(rows)`` over blocks of ``range(n)`` covering it once, in parallel when the
    write is large and the process may use more than one core; return when all are done.

    The calling thread works too, and every thread takes the next block when it is free, so
    a core that the framework's own threads still hold slows the write down least.
    """
    workers = _workers()
    if workers == 1 or nbytes < PARALLEL_MIN_BYTES or n < 2:
        write(slice(0, n))
        return
    step = -(-n // min(n, workers * _BLOCKS_PER_WORKER))
    blocks = iter([slice(start, min(start + step, n)) for start in range(0, n, step)])
    lock = threading.Lock()

    def drain() -> None:
        while True:
            with lock:
                rows = next(blocks, None)
            if rows is None:
                return
            write(rows)

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


def _factor_finite(role: str, inputs: Any, deltas: np.ndarray, dtype: np.dtype) -> bool:
    """True if finite factors bound every entry of the product below the dtype's maximum."""
    if not _finite(deltas) or (role == "kernel" and not _finite(inputs)):
        return False
    bound = float(np.abs(deltas).max(initial=0.0)) * deltas.shape[1]
    if role == "kernel":
        bound *= float(np.abs(inputs).max(initial=0.0))
    return bound < 0.5 * float(np.finfo(dtype).max)


def _finite(array: np.ndarray) -> bool:
    """No NaN/Inf (min/max propagate NaN: no boolean copy of the array)."""
    return array.size == 0 or bool(np.isfinite(array.min()) and np.isfinite(array.max()))
