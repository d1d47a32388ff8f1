"""Writing per-example gradient rows into the NumPy result, on every core.

A per-example result is B × P numbers in new memory: its cost is the write itself (page
faults and memory bandwidth), which one thread cannot saturate. So the rows of each variable
are written in blocks on every core (``gradkit._parallel``; NumPy releases the GIL inside
einsum, matmul and copies). A `Factor` (layer input, pre-activation gradient; see
``gradkit._backends._layer_factors``) is multiplied out straight into the result: ``a δᵀ``
written once, never formed elsewhere first.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from gradkit import _conv_rows as conv
from gradkit._backends._layer_factors import Factor
from gradkit._parallel import in_blocks


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
