"""Per-example gradient norms of Dense and Embedding layers, without per-example gradients.

For a Dense layer ``z = a·W + b`` (then its activation), example i's kernel gradient is
``Σ_t a_t δ_tᵀ`` over its positions t (one for a flat input, every timestep of a sequence),
with ``a`` the layer input and ``δ = ∂L_i/∂z`` the gradient at the pre-activation. So::

    ||g_W||² = ||a||² · ||δ||²                 one position
    ||g_W||² = Σ_{t,s} (a_t·a_s)(δ_t·δ_s)      several (Gram matrices: T² numbers, not in·out)
    ||g_b||² = ||Σ_t δ_t||²

An Embedding scatters ``δ_t`` into row ``id_t``: ``||g_E||² = Σ_{t,s} [id_t = id_s](δ_t·δ_s)``.
A layer called more than once (shared) adds every call's positions to the same sums.

`NormTaps` supplies ``a`` and ``δ``: while installed, each planned layer's ``call`` records its
input, and the adapter's ``perturb(layer, call, z)`` adds a zero perturbation at the
pre-activation (inside a Dense layer's activation; at an Embedding's output). Differentiating
the per-example objective with respect to the perturbations gives ``δ`` with no weight
gradient formed. Layers not planned here (other types, regularized or customized layers) go
through the materializing route. Framework-free: the adapter passes its ops and layer classes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from gradkit._select import walk_layers

_MISSING = object()
_ROLES = {"dense": ("kernel", "bias"), "embedding": ("embeddings",)}
_REGULARIZERS = {"dense": ("kernel_regularizer", "bias_regularizer"),
                 "embedding": ("embeddings_regularizer",)}


class Ops(NamedTuple):
    """The few tensor functions the formulas need, from the adapter's framework."""

    einsum: Callable
    reshape: Callable
    cast: Callable
    equal: Callable
    concat: Callable  # (list of tensors) -> joined along axis 1


class Planned(NamedTuple):
    layer: Any
    kind: str  # "dense" | "embedding"
    roles: dict  # "kernel" / "bias" / "embeddings" -> index into the selected variables


def plan(model: Any, variables: list, dense_cls: type, embedding_cls: type) -> list[Planned]:
    """The layers whose selected variables get the fast formulas, in model order."""
    index = {id(v): j for j, v in enumerate(variables)}
    planned = []
    for _, layer in walk_layers(model):
        kind = _kind(layer, dense_cls, embedding_cls)
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


def _kind(layer: Any, dense_cls: type, embedding_cls: type) -> str | None:
    """"dense"/"embedding" for a plain layer of that type (own call, no regularizer)."""
    for kind, cls in (("dense", dense_cls), ("embedding", embedding_cls)):
        if not isinstance(layer, cls) or type(layer).call is not cls.call:
            continue
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            return None
        if any(getattr(layer, name, None) is not None for name in _REGULARIZERS[kind]):
            return None  # the regularizer's gradient does not pass through z
        if kind == "dense" and getattr(layer, "activation", None) is None:
            return None
        return kind
    return None


class NormTaps:
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
    def installed(self) -> Iterator[NormTaps]:
        """Shadow the planned layers' call (and Dense activation) inside the block."""
        patched: list[tuple[Any, str, Any]] = []
        try:
            for index, (layer, kind, _) in enumerate(self.planned):
                call, activation = layer.call, getattr(layer, "activation", None)
                _shadow(layer, "call", self._recording(index, kind, call), patched)
                if kind == "dense":
                    _shadow(layer, "activation", self._perturbing(index, activation), patched)
            yield self
        finally:
            for layer, name, previous in reversed(patched):
                if previous is _MISSING:
                    object.__delattr__(layer, name)
                else:
                    object.__setattr__(layer, name, previous)

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


def _shadow(layer: Any, name: str, value: Any, patched: list) -> None:
    """Set an instance attribute, remembering what to put back (or that there was none)."""
    patched.append((layer, name, vars(layer).get(name, _MISSING)))
    object.__setattr__(layer, name, value)


def squared_norms(planned: list[Planned], inputs: list[list], deltas: list[list],
                  ops: Ops) -> dict[int, Any]:
    """{variable index: (B,) squared norm} from batched layer inputs and pre-activation δ."""
    result = {}
    for (_, kind, roles), a_calls, d_calls in zip(planned, inputs, deltas):
        dtype = "float64" if "float64" in str(d_calls[0].dtype) else "float32"
        d = ops.concat([_positions(x, ops, dtype) for x in d_calls])
        if kind == "embedding":
            ids = ops.concat([_positions(x, ops, None, keep_last=False) for x in a_calls])
            same = ops.cast(ops.equal(ids[:, :, None], ids[:, None, :]), dtype)
            result[roles["embeddings"]] = ops.einsum("bts,bts->b", same, _gram(d, ops))
            continue
        if "kernel" in roles:
            a = ops.concat([_positions(x, ops, dtype) for x in a_calls])
            result[roles["kernel"]] = _kernel_norm(a, d, ops)
        if "bias" in roles:
            summed = ops.einsum("bto->bo", d)
            result[roles["bias"]] = ops.einsum("bo,bo->b", summed, summed)
    return result


def _positions(x: Any, ops: Ops, dtype: Any, keep_last: bool = True) -> Any:
    """(B, T, features) (or (B, T) ids) from a batched per-example (B, 1, ..., features)."""
    shape = tuple(x.shape)
    inner = shape[1:-1] if keep_last else shape[1:]
    positions = 1
    for size in inner:
        positions *= int(size)
    x = ops.reshape(x, (-1, positions, int(shape[-1])) if keep_last else (-1, positions))
    return x if dtype is None else ops.cast(x, dtype)


def _gram(x: Any, ops: Ops) -> Any:
    return ops.einsum("bti,bsi->bts", x, x)


def _kernel_norm(a: Any, d: Any, ops: Ops) -> Any:
    positions, fan_in, fan_out = int(a.shape[1]), int(a.shape[2]), int(d.shape[2])
    if positions == 1:
        return ops.einsum("bti,bti->b", a, a) * ops.einsum("bto,bto->b", d, d)
    if positions * positions <= fan_in * fan_out:
        return ops.einsum("bts,bts->b", _gram(a, ops), _gram(d, ops))
    grads = ops.einsum("bti,bto->bio", a, d)  # fewer numbers than the Gram matrices
    return ops.einsum("bio,bio->b", grads, grads)
