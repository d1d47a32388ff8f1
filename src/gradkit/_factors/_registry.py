"""The layer kinds with factored per-example gradients: one `Kind` entry each.

A kind says which classes of a layers module (``keras.layers`` or ``tf_keras.layers``) it
covers, when such a layer is plain enough to factor, how its factors are laid out and where its
δ is taken, and, per variable (`Role`), its regularizer, rows writer, squared norm and weighted
sum. `plan` finds the kinds in a model; `write_rows`, `squared_rows` and `weighted_sum`
dispatch on `Factor.role`, which names one role of one kind. A new kind is one more entry in `KINDS`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np

from gradkit._factors import _arrays, _einsum, _normalization, _norms, _rows, _sums
from gradkit._factors._conv import (conv_geometry, separable_geometry, separable_rows64,
                                    transposable)
from gradkit._select import inside_recurrent_layers, walk_layers


class Role(NamedTuple):
    """One variable of a layer kind, found at the layer attribute its `Kind.roles` key names."""

    factor: str  # Factor.role: unique over all kinds
    regularizer: str  # the layer attribute of its regularizer (`_regularizers`)
    uses_inputs: bool  # whether its Factor carries the layer inputs (a bias needs only δ)
    rows: Callable  # (factor, out, product) -> whether the rows are finite
    squared: Callable  # (factor, n) -> (n,) float64 squared norms
    summed: Callable  # (factor, weights, shape) -> float64 Σ_i weights[i] · row_i
    #: (factor, n) -> (n,) float64 ⟨row_i, factor.offset⟩ where a closed form is cheap (the
    #: norms of a regularized variable are then ||f||² + 2⟨f, r⟩ + ||r||²; else rows are formed)
    inner: Callable | None = None


class Kind(NamedTuple):
    """A layer kind with a closed form: what it covers and how its factors are taken."""

    name: str  # Planned.kind
    classes: Callable[[Any], tuple]  # layers module -> the classes of this kind
    roles: dict  # layer attribute ("kernel", "bias", "embeddings") -> Role
    plain: Callable[[Any], bool]  # further conditions on a layer of these classes
    arrays: Callable  # (input calls, delta calls, ops, dtype, scale) -> (a, d); see _arrays
    at_output: bool  # δ taken at the layer's output (else inside its activation, at z)
    geometry: Callable | None = None  # layer -> what its Factors carry as `geometry`
    #: whether it is factored inside a loop over examples compiled into the function
    #: (there the framework's own per-example gradient of a convolution or a normalization
    #: is faster than forming it on the host from factors)
    compiled_loop: bool = True


class Planned(NamedTuple):
    layer: Any
    kind: str  # a `Kind.name`: "dense" | "embedding" | "conv" | "depthwise" | ...
    roles: dict  # "kernel" / "bias" / "embeddings" -> index into the selected variables


class Factor(NamedTuple):
    """One variable's per-example gradient in factored form (see ``gradkit._factors``)."""

    role: str  # a `Role.factor`: "kernel" | "bias" | "embeddings" | "conv_kernel" | ...
    inputs: Any  # (n, T, fan_in) layer inputs, or (n, T) ids; None for a bias
    deltas: Any  # (n, T, fan_out) pre-activation gradients
    #: a convolution's `gradkit._factors._conv.Geometry`, a normalization's axis and constants
    #: (`_normalization`) or an EinsumDense's subscripts (`_einsum`); then inputs
    #: (n, calls, *input shape) and deltas (n, calls, *output shape), in the layer's layout
    geometry: Any = None
    #: the gradient of the variable's regularizer (`_regularizers`), the same for every
    #: example and added to each row; None without one
    offset: Any = None


def _activated(layer: Any) -> bool:
    return getattr(layer, "activation", None) is not None


DENSE = Kind(
    "dense", lambda layers: (layers.Dense,),
    {"kernel": Role("kernel", "kernel_regularizer", True, _rows.dense_kernel,
                    _norms.dense_kernel, _sums.dense_kernel, _norms.dense_kernel_inner),
     "bias": Role("bias", "bias_regularizer", False, _rows.bias, _norms.bias, _sums.bias,
                  _norms.bias_inner)},
    _activated, _arrays.features, at_output=False)

EMBEDDING = Kind(
    "embedding", lambda layers: (layers.Embedding,),
    {"embeddings": Role("embeddings", "embeddings_regularizer", True, _rows.embeddings,
                        _norms.embeddings, _sums.embeddings)},
    lambda layer: True, _arrays.ids, at_output=True)

CONV = Kind(
    "conv", lambda layers: (layers.Conv1D, layers.Conv2D, layers.Conv3D),
    {"kernel": Role("conv_kernel", "kernel_regularizer", True, _rows.conv_kernel,
                    _norms.conv_kernel, _sums.conv_kernel),
     "bias": Role("conv_bias", "bias_regularizer", False, _rows.conv_bias, _norms.conv_bias,
                  _sums.conv_bias, _norms.bias_inner)},
    _activated, _arrays.spatial, at_output=False, geometry=conv_geometry, compiled_loop=False)


def _transposed_classes(layers: Any) -> tuple:
    return tuple(getattr(layers, f"Conv{rank}DTranspose") for rank in (1, 2, 3)
                 if hasattr(layers, f"Conv{rank}DTranspose"))


CONV_TRANSPOSE = Kind(
    "conv_transpose", _transposed_classes,
    {"kernel": Role("transposed_kernel", "kernel_regularizer", True, _rows.transposed_kernel,
                    _norms.transposed_kernel, _sums.transposed_kernel),
     "bias": CONV.roles["bias"]},
    lambda layer: _activated(layer) and transposable(layer), _arrays.spatial,
    at_output=False, geometry=conv_geometry, compiled_loop=False)


def _separable_classes(layers: Any) -> tuple:
    return tuple(getattr(layers, f"SeparableConv{rank}D") for rank in (1, 2)
                 if hasattr(layers, f"SeparableConv{rank}D"))




def _depthwise_classes(layers: Any) -> tuple:
    return tuple(getattr(layers, name) for name in ("DepthwiseConv1D", "DepthwiseConv2D")
                 if hasattr(layers, name))


_DEPTHWISE_KERNEL = Role("depthwise_kernel", "depthwise_regularizer", True,
                         _rows.depthwise_kernel, _norms.depthwise_kernel,
                         _sums.depthwise_kernel)

DEPTHWISE = Kind(
    "depthwise", _depthwise_classes,
    {"kernel": _DEPTHWISE_KERNEL,  # Keras 3's attribute
     "depthwise_kernel": _DEPTHWISE_KERNEL,  # tf-keras'
     "bias": CONV.roles["bias"]},
    _activated, _arrays.spatial, at_output=False, geometry=conv_geometry)


def _formed(name: str, regularizer: str, uses_inputs: bool, rows64: Callable,
            summed: Callable | None = None) -> Role:
    """A role whose (small) rows are formed whole by ``rows64(factor, n)``."""
    return Role(name, regularizer, uses_inputs, _rows.from_rows64(rows64),
                _norms.from_rows64(rows64), summed or _sums.from_rows64(rows64))


SEPARABLE = Kind(
    "separable", _separable_classes,
    {"depthwise_kernel": _formed("separable_depthwise", "depthwise_regularizer", True,
                                 separable_rows64(0)),
     "pointwise_kernel": _formed("separable_pointwise", "pointwise_regularizer", True,
                                 separable_rows64(1)),
     "bias": CONV.roles["bias"]},
    _activated, _arrays.spatial, at_output=False, geometry=separable_geometry,
    compiled_loop=False)

_OFFSET = _formed("norm_beta", "beta_regularizer", False, _normalization.offset_rows64)

BATCH_NORMALIZATION = Kind(
    "batch_normalization", lambda layers: (layers.BatchNormalization,),
    {"gamma": _formed("bn_gamma", "gamma_regularizer", True, _normalization.scale_rows64),
     "beta": _OFFSET},
    _normalization.plain, _arrays.spatial, at_output=True, geometry=_normalization.moments,
    compiled_loop=False)

LAYER_NORMALIZATION = Kind(
    "layer_normalization", lambda layers: (layers.LayerNormalization,),
    {"gamma": _formed("ln_gamma", "gamma_regularizer", True,
                      _normalization.normalized_scale_rows64),
     "beta": _OFFSET},
    _normalization.plain_layer_normalization, _arrays.spatial, at_output=True,
    geometry=_normalization.features, compiled_loop=False)

GROUP_NORMALIZATION = Kind(
    "group_normalization", lambda layers: (layers.GroupNormalization,),
    {"gamma": _formed("gn_gamma", "gamma_regularizer", True,
                      _normalization.grouped_scale_rows64),
     "beta": _OFFSET},
    lambda layer: isinstance(layer.axis, int), _arrays.spatial, at_output=True,
    geometry=_normalization.groups, compiled_loop=False)

EINSUM_DENSE = Kind(
    "einsum_dense", lambda layers: (layers.EinsumDense,),
    {"kernel": Role("einsum_kernel", "kernel_regularizer", True, _rows.einsum_kernel,
                    _norms.einsum_kernel, _einsum.kernel_summed, _norms.einsum_kernel_inner),
     "bias": _formed("einsum_bias", "bias_regularizer", False, _einsum.bias_rows64)},
    lambda layer: _activated(layer) and _einsum.plain(layer), _arrays.spatial,
    at_output=False, geometry=_einsum.einsum_geometry, compiled_loop=False)

#: Every kind, by name, in the order a layer's class is matched against them.
KINDS = {kind.name: kind for kind in (DENSE, EMBEDDING, CONV, CONV_TRANSPOSE, SEPARABLE,
                                      DEPTHWISE, BATCH_NORMALIZATION, LAYER_NORMALIZATION,
                                      GROUP_NORMALIZATION, EINSUM_DENSE)}
#: Every role of every kind, by `Factor.role`.
ROLES = {role.factor: role for kind in KINDS.values() for role in kind.roles.values()}


def plan(model: Any, variables: list, layers_module: Any) -> list[Planned]:
    """The layers whose selected variables are factored, in model order (`layers_module`:
    ``keras.layers`` or ``tf_keras.layers``)."""
    index = {id(v): j for j, v in enumerate(variables)}
    classes = [(kind, cls) for kind in KINDS.values() for cls in kind.classes(layers_module)]
    # a custom cell's Dense runs inside the time loop, which a tap's recording cannot leave
    in_loops = inside_recurrent_layers(model, layers_module)
    planned = []
    for _, layer in walk_layers(model):
        kind = None if id(layer) in in_loops else _kind(layer, classes)
        if kind is None:
            continue
        roles = {}
        for attribute in kind.roles:
            variable = getattr(layer, attribute, None)
            if variable is not None and id(variable) in index:
                roles[attribute] = index[id(variable)]
        if roles:
            planned.append(Planned(layer, kind.name, roles))
    return planned


def _kind(layer: Any, classes: list) -> Kind | None:
    """The kind of a plain layer of one of `classes` (its class's own call; weight regularizers
    of any kind: see `_regularizers`), or None."""
    for kind, cls in classes:
        if not isinstance(layer, cls) or type(layer).call is not cls.call:
            continue
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            return None
        return kind if kind.plain(layer) else None
    return None


def unfactored_convolution(model: Any, variables: list, layers_module: Any) -> str | None:
    """The first convolution-like layer whose selected kernel has no factors (a customized one,
    or one with a padding other than "valid" and "same"), named, or None. A vectorizer forms
    its per-example kernel gradients as one grouped convolution over the batch: many times
    slower than a loop of single-example gradients on CPU (JAX: 10x on MobileNetV2) and
    memory-hungry."""
    factored = {id(entry.layer) for entry in plan(model, variables, layers_module)}
    selected = {id(v) for v in variables}
    for path, layer in walk_layers(model):
        if id(layer) in factored or not any(
                "Conv" in cls.__name__ for cls in type(layer).__mro__):
            continue
        if any(id(v) in selected and len(v.shape) >= 3 for v in layer.trainable_weights):
            return (f"layer {path!r} ({type(layer).__name__}): vectorized per-example "
                    "convolution kernels run as grouped convolutions, slower than the loop")
    return None


def rest(planned: list[Planned], count: int) -> list[int]:
    """Indices of the selected variables that are not factored (differentiated directly)."""
    covered = {j for entry in planned for j in entry.roles.values()}
    return [j for j in range(count) if j not in covered]


def write_rows(part: Any, out: np.ndarray, product: Callable | None = None) -> bool:
    """Write one variable's per-example gradients (an array or a `Factor`) into `out`.

    `product(inputs, deltas, out)`, when given, writes the Dense kernel rows
    ``Σ_t a_t δ_tᵀ`` instead of NumPy (an adapter whose framework keeps its own threads
    busy-waiting on every core, as torch's OpenMP does, writes them with those threads).
    Returns whether the rows are finite, from the small factors when a bound allows it.
    """
    if not isinstance(part, Factor):
        return _rows.copy_rows(part, out)
    finite = ROLES[part.role].rows(part, out, product)
    if part.offset is None:
        return finite
    out += part.offset.astype(out.dtype)
    return _rows.finite(out)


def squared_rows(part: Any, n: int) -> np.ndarray:
    """Squared L2 norm of each of the first `n` rows (an array, or a `Factor`: closed forms)."""
    if not isinstance(part, Factor):
        return _norms.array_squared(part, n)
    role = ROLES[part.role]
    if part.offset is None:
        return role.squared(part, n)
    if role.inner is None:  # ||f_i + r||² of rows formed a block of examples at a time
        return _norms.offset_squared(part, n, role.rows)
    r = np.asarray(part.offset, dtype=np.float64).ravel()
    return role.squared(part, n) + 2.0 * role.inner(part, n) + r @ r


def weighted_sum(part: Any, weights: np.ndarray, shape: tuple) -> np.ndarray:
    """``Σ_i weights[i] · row_i`` (float64, `shape`) over the first ``len(weights)`` rows of
    one variable's per-example gradients (an array, or a `Factor`: rows never formed)."""
    if not isinstance(part, Factor):
        return _sums.array_sum(part, weights, shape)
    total = ROLES[part.role].summed(part, weights, shape)
    if part.offset is not None:
        total = total + np.sum(weights, dtype=np.float64) * part.offset.reshape(shape)
    return total
