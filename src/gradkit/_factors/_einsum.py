"""EinsumDense factors: per-example kernel and bias gradients from its einsum (NumPy).

An EinsumDense layer computes ``z = einsum(equation, a, K) + b`` (then its activation), so
for a batch whose axis is the equation's batch letter, the kernel gradient is
``einsum("{inputs},{output}->{kernel}", a, δ)``. Keeping the batch letter in the output
gives every example's own gradient at once; the layer's calls (and the batch-of-one axis
each recorded example keeps) add up. A bias is broadcast over the leading output axes and
any of its own axes of size 1, so its gradient sums δ over those.

The factors are the layer input and δ at its pre-activation in the `spatial` layout
(n, calls, *input shape) and (n, calls, *output shape), and the layer's `Einsum`. An
ellipsis is spelled out with letters of its own for the arrays at hand.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from gradkit._factors._positions import positions_summed

_FREE = "ZYXWVUTSRQPONMLKJIHGFEDCBAzyxwvutsrqponmlkjihgfedcba"


class Einsum(NamedTuple):
    inputs: str  # the equation's input subscripts, as written ("abc", "...b")
    kernel: str
    output: str
    bias_shape: tuple | None


def einsum_geometry(layer: Any) -> Einsum:
    """The subscripts and bias shape of a Keras (3 or 2) EinsumDense layer."""
    inputs, rest = layer.equation.replace(" ", "").split(",")
    kernel, output = rest.split("->")
    bias = getattr(layer, "bias", None)
    return Einsum(inputs, kernel, output, None if bias is None else tuple(bias.shape))


def plain(layer: Any) -> bool:
    """An equation of one input and the kernel, with an ellipsis (if any) on the input and
    output only, at the same end of both, and no repeated letter on one operand."""
    try:
        geometry = einsum_geometry(layer)
    except (AttributeError, ValueError):
        return False
    inputs, kernel, output = geometry.inputs, geometry.kernel, geometry.output
    if "." in kernel or inputs.count("...") != output.count("..."):
        return False
    if "..." in inputs and (inputs.startswith("...") != output.startswith("...")):
        return False
    letters = [spec.replace("...", "") for spec in (inputs, kernel, output)]
    return all(len(set(spec)) == len(spec) for spec in letters) and bool(letters[0])


def kernel_rows64(part: Any, n: int) -> np.ndarray:
    """(n, *kernel shape) per-example kernel gradients, summed over calls."""
    geometry, a, d = part.geometry, np.asarray(part.inputs)[:n], np.asarray(part.deltas)[:n]
    batch, inputs, output = _spelled(geometry, a.ndim - 1)
    equation = f"{inputs},{output}->{batch}{geometry.kernel}"
    total = None
    for call in range(a.shape[1]):
        grads = np.einsum(equation, a[:, call], d[:, call], optimize=True)
        total = grads if total is None else total + grads
    return total.astype(np.float64)


def as_matmul(part: Any, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(A, D)`` of shapes (n, S, I) and (n, S, O) with ``g_K[i] = A[i]ᵀ D[i]`` reshaped to the
    kernel, where the kernel's letters are its input letters followed by its output letters
    (``abc,cde->abde``, ``abcd,cde->abe``): S runs over the calls and the letters the input
    and output share. None for any other layout (then `kernel_rows64`)."""
    geometry, a, d = part.geometry, np.asarray(part.inputs)[:n], np.asarray(part.deltas)[:n]
    batch, inputs, output = _spelled(geometry, a.ndim - 1)
    kernel = geometry.kernel
    taken = [c for c in kernel if c in inputs and c not in output]
    given = [c for c in kernel if c in output and c not in inputs]
    shared = [c for c in inputs if c in output and c != batch]
    if (kernel != "".join(taken + given) or any(c in kernel for c in shared)
            or set(inputs) != {batch, *shared, *taken}
            or set(output) != {batch, *shared, *given}):
        return None
    calls = a.shape[1]
    a = a.transpose(_axes(inputs, batch, shared + taken))
    d = d.transpose(_axes(output, batch, shared + given))
    rows = calls * int(np.prod([a.shape[2 + k] for k in range(len(shared))], dtype=np.int64))
    return a.reshape(n, rows, -1), d.reshape(n, rows, -1)


def _axes(spec: str, batch: str, letters: list) -> list[int]:
    """Axes of an (n, calls, *spec without its batch letter) array in the order
    (n, calls, *letters)."""
    own = [c for c in spec if c != batch]
    return [0, 1] + [2 + own.index(c) for c in letters]


def bias_rows64(part: Any, n: int) -> np.ndarray:
    """(n, *bias shape): δ summed over every call and the axes the bias is broadcast over."""
    d = np.asarray(part.deltas)[:n]
    shape = part.geometry.bias_shape
    lead = d.ndim - len(shape)
    summed = positions_summed(d.reshape(n, -1, max(1, math.prod(d.shape[lead:]))),
                              np.float64).reshape(n, *d.shape[lead:])
    for axis, size in enumerate(shape, start=1):
        if size == 1 and summed.shape[axis] != 1:
            summed = summed.sum(axis=axis, keepdims=True)
    return summed


def kernel_summed(part: Any, weights: np.ndarray, shape: tuple) -> np.ndarray:
    """``Σ_i w_i g_K[i]``: one einsum of the inputs with the reweighted deltas (the batch
    letter summed), per call."""
    geometry, n = part.geometry, len(weights)
    a, d = np.asarray(part.inputs)[:n], np.asarray(part.deltas)[:n]
    d = d * weights.astype(np.promote_types(d.dtype, np.float32)).reshape(
        (n,) + (1,) * (d.ndim - 1))
    _, inputs, output = _spelled(geometry, a.ndim - 1)
    equation = f"{inputs},{output}->{geometry.kernel}"
    total = sum(np.einsum(equation, a[:, call], d[:, call], optimize=True)
                for call in range(a.shape[1]))
    return np.asarray(total, np.float64).reshape(shape)


def _spelled(geometry: Einsum, input_ndim: int) -> tuple[str, str, str]:
    """(batch letter, input subscripts, output subscripts) for arrays whose first axis is the
    batch, the ellipsis replaced by letters of its own."""
    inputs, output = geometry.inputs, geometry.output
    if "..." in inputs:
        used = set(inputs + geometry.kernel + output)
        free = [c for c in _FREE if c not in used]
        spelled = "".join(free[:input_ndim - (len(inputs) - 3)])
        inputs, output = inputs.replace("...", spelled), output.replace("...", spelled)
    return inputs[0], inputs, output
