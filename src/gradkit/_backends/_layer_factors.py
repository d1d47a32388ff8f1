"""Per-example gradients of Dense, Embedding and Conv layers as factors: layer input × output
gradient.

For a Dense layer ``z = a·W + b`` (then its activation), example i's gradients are

    g_W = Σ_t a_t δ_tᵀ        g_b = Σ_t δ_t

over its positions t (one for a flat input, every timestep of a sequence), with ``a`` the layer
input and ``δ = ∂L_i/∂z`` the gradient at the pre-activation. An Embedding scatters ``δ_t``
into row ``id_t``. A layer called more than once (shared) adds every call's positions. So the
small per-example factors ``(a, δ)`` carry the whole gradient: the front door writes
``a δᵀ`` straight into its NumPy result (one write of B × P numbers) or takes the norm from
them without forming it (``||g_W||² = Σ_{t,s} (a_t·a_s)(δ_t·δ_s)``). A convolution is the
same sum over its output positions, with ``a_t`` the input patch under position t: its
factors keep their spatial shape and its geometry (``gradkit._conv_rows``).

`LayerTaps` collects the factors: while installed, each planned layer's ``call`` records its
input, and the adapter's ``perturb(layer, call, z)`` adds a zero perturbation at the
pre-activation (inside a Dense or Conv layer's activation; at an Embedding's output). The adapter
differentiates each example's objective with respect to those perturbations inside its
vectorizer. Layers not planned here (other types; regularized, LoRA, quantized or customized
Dense/Embedding/Conv, grouped convolutions) are differentiated directly. Framework-free:
adapters pass their ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from gradkit._backends._taps import restore, shadow
from gradkit._conv_rows import conv_geometry
from gradkit._select import walk_layers

_ROLES = {"dense": ("kernel", "bias"), "embedding": ("embeddings",), "conv": ("kernel", "bias")}
_REGULARIZERS = {"dense": ("kernel_regularizer", "bias_regularizer"),
                 "embedding": ("embeddings_regularizer",),
                 "conv": ("kernel_regularizer", "bias_regularizer")}


class Ops(NamedTuple):
    """The few tensor functions `factor_arrays` needs, from the adapter's framework."""

    reshape: Callable
    cast: Callable
    concat: Callable  # (list of tensors) -> joined along axis 1


class Planned(NamedTuple):
    layer: Any
    kind: str  # "dense" | "embedding" | "conv"
    roles: dict  # "kernel" / "bias" / "embeddings" -> index into the selected variables


class Factor(NamedTuple):
    """One variable's per-example gradient in factored form (see the module docstring)."""

    role: str  # "kernel" | "bias" | "embeddings" | "conv_kernel"
    inputs: Any  # (n, T, fan_in) layer inputs, or (n, T) ids; None for a bias
    deltas: Any  # (n, T, fan_out) pre-activation gradients
    #: a convolution's `gradkit._conv_rows.Geometry`; then inputs (n, calls, *input shape)
    #: and deltas (n, calls, *output shape), both with the layer's channel axis
    geometry: Any = None


def plan(model: Any, variables: list, dense_cls: type, embedding_cls: type,
         conv_classes: tuple = ()) -> list[Planned]:
    """The layers whose selected variables are factored, in model order (`conv_classes`:
    the framework's Conv1D/2D/3D)."""
    index = {id(v): j for j, v in enumerate(variables)}
    planned = []
    classes = [("dense", dense_cls), ("embedding", embedding_cls)]
    classes += [("conv", cls) for cls in conv_classes]
    for _, layer in walk_layers(model):
        kind = _kind(layer, classes)
        if kind is None:
            continue
        roles = {}
        for role in _ROLES[kind]:
            variable = getattr(layer, role, None)
            if variable is not None and id(variable) in index:
                roles[role] = index[id(variable)]
        if roles:
            planned.append(Planned(layer, kind, roles))
    return planned


def _kind(layer: Any, classes: list) -> str | None:
    """The kind of a plain layer of one of `classes` (own call, no regularizer), or None."""
    for kind, cls in classes:
        if not isinstance(layer, cls) or type(layer).call is not cls.call:
            continue
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            return None
        if any(getattr(layer, name, None) is not None for name in _REGULARIZERS[kind]):
            return None  # the regularizer's gradient does not pass through z
        if kind != "embedding" and getattr(layer, "activation", None) is None:
            return None
        if kind == "conv" and getattr(layer, "groups", 1) != 1:
            return None
        return kind
    return None


def rest(planned: list[Planned], count: int) -> list[int]:
    """Indices of the selected variables that are not factored (differentiated directly)."""
    covered = {j for entry in planned for j in entry.roles.values()}
    return [j for j in range(count) if j not in covered]


class LayerTaps:
    """Record planned layers' inputs and route their pre-activations through `perturb`."""

    def __init__(self, planned: list[Planned]):
        self.planned = planned
        self.perturb: Callable[[int, int, Any], Any] = lambda layer, call, z: z
        self.inputs: list[list] = [[] for _ in planned]

    def start(self, perturb: Callable[[int, int, Any], Any]) -> None:
        """Use `perturb(layer index, call index, z)` for the next forward pass."""
        self.perturb = perturb
        self.inputs = [[] for _ in self.planned]

    @contextlib.contextmanager
    def installed(self) -> Iterator[LayerTaps]:
        """Shadow the planned layers' call (and Dense activation) inside the block."""
        patched: list[tuple[Any, str, Any]] = []
        try:
            for index, (layer, kind, _) in enumerate(self.planned):
                call, activation = layer.call, getattr(layer, "activation", None)
                shadow(layer, "call", self._recording(index, kind, call), patched)
                if kind != "embedding":
                    shadow(layer, "activation", self._perturbing(index, activation), patched)
            yield self
        finally:
            restore(patched)

    def _recording(self, index: int, kind: str, call: Callable) -> Callable:
        def recording(*args: Any, **kwargs: Any) -> Any:
            self.inputs[index].append(args[0] if args else kwargs["inputs"])
            output = call(*args, **kwargs)
            if kind == "embedding":
                output = self.perturb(index, len(self.inputs[index]) - 1, output)
            return output

        return recording

    def _perturbing(self, index: int, activation: Callable) -> Callable:
        def perturbing(z: Any) -> Any:
            return activation(self.perturb(index, len(self.inputs[index]) - 1, z))

        return perturbing


def factor_arrays(planned: list[Planned], inputs: list[list], deltas: list[list],
                  ops: Ops, scale: Any = None) -> list[tuple]:
    """[(inputs (n, T, in) or ids (n, T), deltas (n, T, out)) per planned layer], all calls
    joined along T, from batched per-example recordings shaped (n, 1, ..., features).

    Factors are float32 (float64 for float64 layers); the deltas are divided by the loss
    `scale` after that cast, so float16 gradients are unscaled without underflow.
    """
    arrays = []
    for (_, kind, _), a_calls, d_calls in zip(planned, inputs, deltas):
        dtype = "float64" if "float64" in str(d_calls[0].dtype) else "float32"
        if kind == "conv":  # spatial shapes kept, calls along axis 1
            d = ops.concat([ops.cast(x, dtype) for x in d_calls])
            a = ops.concat([ops.cast(x, dtype) for x in a_calls])
            arrays.append((a, d if scale is None else d / ops.cast(scale, dtype)))
            continue
        d = ops.concat([_positions(x, ops, dtype) for x in d_calls])
        if scale is not None:
            d = d / ops.cast(scale, dtype)
        if kind == "embedding":
            a = ops.concat([_positions(x, ops, None, keep_last=False) for x in a_calls])
        else:
            a = ops.concat([_positions(x, ops, dtype) for x in a_calls])
        arrays.append((a, d))
    return arrays


def assemble(count: int, planned: list[Planned], arrays: list[tuple], rest_grads: list) -> list:
    """One entry per selected variable: a `Factor`, or its directly computed (n, ...) array."""
    result: list[Any] = [None] * count
    for entry, (a, d) in zip(planned, arrays):
        geometry = conv_geometry(entry.layer) if entry.kind == "conv" else None
        for role, j in entry.roles.items():
            if geometry is not None and role == "kernel":
                role = "conv_kernel"
            result[j] = Factor(role, None if role == "bias" else a, d, geometry)
    for j, grad in zip(rest(planned, count), rest_grads):
        result[j] = grad
    return result


def _positions(x: Any, ops: Ops, dtype: Any, keep_last: bool = True) -> Any:
    """(n, T, features) (or (n, T) ids) from a batched per-example (n, 1, ..., features)."""
    shape = tuple(x.shape)
    inner = shape[1:-1] if keep_last else shape[1:]
    positions = 1
    for size in inner:
        positions *= int(size)
    x = ops.reshape(x, (-1, positions, int(shape[-1])) if keep_last else (-1, positions))
    return x if dtype is None else ops.cast(x, dtype)
