"""Writing per-example gradient rows into the NumPy result, on every core: one writer per role.

A per-example result is B × P numbers in new memory: its cost is the write itself (page
faults and memory bandwidth), which one thread cannot saturate. So the rows of each variable
are written in blocks on every core (``gradkit._parallel``; NumPy releases the GIL inside
einsum, matmul and copies). A `Factor` (layer input, pre-activation gradient) is multiplied
out straight into the result: ``a δᵀ`` written once, never formed elsewhere first.

Every writer is ``(factor, out, product) -> finite`` and writes the first ``len(out)`` rows;
``gradkit._factors._registry`` says which writer serves which role.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from gradkit._factors import _conv as conv
from gradkit._factors import _einsum as einsum
from gradkit._factors._positions import positions_summed
from gradkit._parallel import in_blocks


def copy_rows(rows: Any, out: np.ndarray) -> bool:
    """Copy a variable's materialized (n, ...) rows (an array, or a list of one array per
    example: the loop route's, never stacked first) into `out`; whether they are finite."""
    n = out.shape[0]
    if isinstance(rows, list):
        np.stack(rows[:n], out=out)
        return finite(out)
    rows = np.asarray(rows)[:n].reshape(out.shape)
    in_blocks(n, out.nbytes, lambda s: np.copyto(out[s], rows[s]))
    return finite(out)


def dense_kernel(part: Any, out: np.ndarray, product: Callable | None = None) -> bool:
    """``out[i] = Σ_t a_it δ_itᵀ``, by `product(inputs, deltas, out)` when given."""
    n = out.shape[0]
    inputs, deltas = np.asarray(part.inputs)[:n], np.asarray(part.deltas)[:n]
    (product or kernel_rows)(inputs, deltas, out)
    return product_finite(out, deltas, inputs)


def bias(part: Any, out: np.ndarray, product: Callable | None = None) -> bool:
    """``out[i] = Σ_t δ_it`` (a Dense bias)."""
    deltas = np.asarray(part.deltas)[:out.shape[0]]
    positions_summed(deltas, out.dtype, out=out)
    return finite(out)  # no larger than the deltas


def embeddings(part: Any, out: np.ndarray, product: Callable | None = None) -> bool:
    """``δ_it`` added into row ``id_it`` of ``out[i]`` (zero elsewhere).

    The deltas sorted by row (stable: in position order); the first of each (example, id)
    is written, the others (an id repeated in an example) added to it in order. Few repeats
    are added by ``np.add.at`` (about 1.4 µs a delta), many by one ``np.add.reduceat``
    (about 0.25 µs a row, also for rows without repeats); both sum each row left to right."""
    n = out.shape[0]
    if n == 0:
        return True
    ids, deltas = np.asarray(part.inputs)[:n], np.asarray(part.deltas)[:n]
    rows = out.reshape(n * out.shape[1], int(np.prod(out.shape[2:])))
    where = (np.arange(n)[:, None] * out.shape[1] + ids.reshape(n, -1)).ravel()
    order = np.argsort(where, kind="stable")
    where, deltas_sorted = where[order], deltas.reshape(len(order), -1)[order]
    first = np.concatenate([[True], where[1:] != where[:-1]])[:len(where)]
    if out.flags.c_contiguous:  # a byte fill: memset, twice the speed of a float fill
        out.reshape(-1).view(np.uint8).fill(0)
    else:
        out[...] = 0
    repeats = len(where) - int(np.count_nonzero(first))
    if repeats <= _FEW_REPEATS:
        rows[where[first]] = deltas_sorted[first]
        if repeats:
            np.add.at(rows, where[~first], deltas_sorted[~first])
    else:
        rows[where[first]] = np.add.reduceat(deltas_sorted, np.flatnonzero(first), axis=0)
    return product_finite(out, deltas)


_FEW_REPEATS = 32  # repeated ids an embedding's rows add one by one (`embeddings`)


def conv_kernel(part: Any, out: np.ndarray, product: Callable | None = None) -> bool:
    """A convolution's kernel rows (im2col, ``gradkit._factors._conv``); small, checked directly."""
    n = out.shape[0]
    conv.kernel_rows(np.asarray(part.inputs)[:n], np.asarray(part.deltas)[:n],
                     part.geometry, out)
    return finite(out)


def transposed_kernel(part: Any, out: np.ndarray, product: Callable | None = None) -> bool:
    """A transposed convolution's kernel rows (``gradkit._factors._conv``); checked directly."""
    n = out.shape[0]
    conv.transposed_rows(np.asarray(part.inputs)[:n], np.asarray(part.deltas)[:n],
                         part.geometry, out)
    return finite(out)


def depthwise_kernel(part: Any, out: np.ndarray, product: Callable | None = None) -> bool:
    """A depthwise convolution's kernel rows (``gradkit._factors._conv``); small, checked
    directly."""
    n = out.shape[0]
    conv.depthwise_rows(np.asarray(part.inputs)[:n], np.asarray(part.deltas)[:n],
                        part.geometry, out)
    return finite(out)


def conv_bias(part: Any, out: np.ndarray, product: Callable | None = None) -> bool:
    """``out[i] = Σ_t δ_it`` over every call and output position of a convolution."""
    positions_summed(conv.bias_deltas(part.deltas, part.geometry)[:out.shape[0]], out.dtype,
                     out=out)
    return finite(out)


def einsum_kernel(part: Any, out: np.ndarray, product: Callable | None = None) -> bool:
    """An EinsumDense kernel's rows: like a Dense kernel's (``Σ_s a_s δ_sᵀ``, straight into
    the result) where its letters allow (``_einsum.as_matmul``), else formed whole."""
    n = out.shape[0]
    factors = einsum.as_matmul(part, n)
    if factors is None:
        out[...] = einsum.kernel_rows64(part, n).reshape(out.shape)
        return finite(out)
    inputs, deltas = factors
    (product or kernel_rows)(inputs, deltas, out.reshape(n, inputs.shape[2], deltas.shape[2]))
    return product_finite(out, deltas, inputs)


def from_rows64(rows64: Callable) -> Callable:
    """The writer of a role whose rows are small and formed whole: ``rows64(factor, n)``
    gives them as (n, ...) float64 (normalization scales, EinsumDense biases)."""
    def write(part: Any, out: np.ndarray, product: Callable | None = None) -> bool:
        out[...] = rows64(part, out.shape[0]).reshape(out.shape)
        return finite(out)

    return write


def kernel_rows(inputs: np.ndarray, deltas: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = Σ_t a_it δ_itᵀ`` for inputs (n, T, in) and deltas (n, T, out), in blocks."""
    if inputs.shape[1] == 1:  # a_i δ_iᵀ, written once, straight into the result
        a, d = inputs[:, 0], deltas[:, 0]
        in_blocks(len(out), out.nbytes,
                  lambda s: np.einsum("bi,bo->bio", a[s], d[s], out=out[s]))
    else:
        a = inputs.transpose(0, 2, 1)
        in_blocks(len(out), out.nbytes, lambda s: np.matmul(a[s], deltas[s], out=out[s]))


def product_finite(out: np.ndarray, deltas: np.ndarray, inputs: Any = None) -> bool:
    """Whether rows `out` written from the factors are finite: from a bound on the factors
    where they hold far fewer numbers than `out` (an embedding's rows, a wide kernel's),
    else from `out` itself (`inputs` None: the rows sum the deltas alone)."""
    factors = deltas.size + (0 if inputs is None else np.size(inputs))
    return (out.size > 2 * factors and bounded(deltas, out.dtype, inputs)) or finite(out)


def bounded(deltas: np.ndarray, dtype: np.dtype, inputs: Any = None) -> bool:
    """True if finite factors bound every entry of the product below the dtype's maximum.
    ``|max| + |min|`` bounds every |entry| in two passes and no copy; a NaN or Inf in a
    factor makes the bound NaN or Inf, so False."""
    def peak(x: np.ndarray) -> float:
        return abs(float(x.max(initial=0.0))) + abs(float(x.min(initial=0.0)))

    bound = peak(deltas) * deltas.shape[1]
    if inputs is not None:
        bound *= peak(inputs)
    return bound < 0.5 * float(np.finfo(dtype).max)


def finite(array: np.ndarray) -> bool:
    """No NaN/Inf: a finite sum has none (NaN and Inf propagate through it), so one pass
    decides the usual case; a sum that overflowed is settled by min and max (which
    propagate NaN: no boolean copy of the array)."""
    if array.size == 0 or np.isfinite(array.sum()):
        return True
    return bool(np.isfinite(array.min()) and np.isfinite(array.max()))
