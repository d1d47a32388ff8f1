"""Keras 3 on JAX: `jax.value_and_grad` over `stateless_call`, inside a cached `jax.jit`.

XLA compiles one program per input shape; a compiled program is reused for every later call
with the same shapes. `compute_gradients` pads a batch to an already compiled batch size
where that is provably exact (gradkit._backends._buckets), so varying batch sizes do not
compile again. Variable values are read fresh on every call (`fit` donates buffers).
Which variables are connected to the objective is read off the traced program once, since
`jax.grad` returns zeros, not None, for a variable the objective does not use.
"""

from __future__ import annotations

import weakref
from typing import Any

import jax
import numpy as np

from gradkit._backends import _buckets
from gradkit._backends import _cache
from gradkit._backends import _keras3 as k3
from gradkit._backends._taps import OutputTaps
from gradkit._data import Batch, leaves, map_structure
from gradkit._objective import Objective

_CACHE: "weakref.WeakKeyDictionary[Any, _cache.BoundedCache]" = weakref.WeakKeyDictionary()


class _Entry:
    def __init__(self, fn, selected, buckets=None):
        self.fn = fn
        self.selected = selected
        self.connected: list[bool] | None = None
        self.buckets: _buckets.Buckets | None = buckets  # None: one program per batch size


def compute_gradients(model, variables, objective: Objective, batch: Batch, training: bool):
    k3.check_built(model)
    key = (tuple(id(v) for v in variables), objective.cache_key(), bool(training))
    per_model = _cache.per_model(_CACHE, model)
    if key not in per_model:
        per_model[key] = _build(model, variables, objective, training, buckets=True)
    entry = per_model[key]
    try:
        outputs = _run(model, entry, batch)
    except _buckets.PaddingNotExact:  # found while tracing: one program per shape from now
        entry.buckets = None
        outputs = _run(model, entry, batch)
    (_, loss), grads = jax.device_get(outputs)
    return float(loss), [g if ok else None for g, ok in zip(grads, entry.connected)]


def _run(model, entry: _Entry, batch: Batch):
    """entry.fn on `batch`, padded to an already compiled size where that is exact."""
    extra = ()
    if entry.buckets is not None and _buckets.paddable(batch):
        batch, valid_rows = _buckets.pad(batch, entry.buckets.size_for(batch.size))
        extra = (valid_rows,)
    args = (*_arguments(model, entry, batch), *extra)
    if entry.connected is None:
        entry.connected = _connected(entry.fn, args)  # traces fn: the call reuses the trace
        args = (*_arguments(model, entry, batch), *extra)  # which may build loss metrics
    return entry.fn(*args)


def _arguments(model, entry: _Entry, batch: Batch) -> tuple:
    scale = k3.loss_scale(model)
    return (*split_values(model, entry.selected), batch.x, batch.y, batch.sample_weight,
            None if scale == 1.0 else np.float32(scale))


def split_values(model, selected: list[int]) -> tuple[list, list, list, list]:
    """(selected trainable, other trainable, non-trainable, metrics) values, read fresh."""
    trainable, non_trainable, metrics = k3.variable_values(model)
    chosen = set(selected)
    return ([trainable[i] for i in selected],
            [v for i, v in enumerate(trainable) if i not in chosen], non_trainable, metrics)


def _build(model, variables, objective, training, buckets=False):
    """An entry whose jitted fn(chosen, others, non_trainable, metrics, x, y, sample_weight,
    scale, valid_rows=None) gives ((scaled loss, loss), unscaled gradients of `chosen`).

    ``scale=None`` means 1 (no multiplication, no division); ``valid_rows`` marks the real
    rows of a padded batch. With `buckets`, batches are padded where that is exact.
    """
    model_ref = weakref.ref(model)
    objective = k3.prepare_objective(objective)
    selected = k3.selected_indices(model, variables)

    def scaled_objective(chosen, others, non_trainable, metrics, x, y, sample_weight, scale,
                         valid_rows):
        loss = k3.objective_value(
            model_ref(), objective, training, k3.merge_trainable(selected, chosen, others),
            non_trainable, metrics, x, y, sample_weight, valid_rows=valid_rows,
        ).astype("float32")
        return (loss if scale is None else loss * scale), loss

    def value_and_unscaled_grads(chosen, others, non_trainable, metrics, x, y, sample_weight,
                                 scale, valid_rows=None):
        (scaled, loss), grads = jax.value_and_grad(scaled_objective, has_aux=True)(
            chosen, others, non_trainable, metrics, x, y, sample_weight, scale, valid_rows)
        if scale is not None:
            grads = [g / scale.astype(g.dtype) for g in grads]
        return (scaled, loss), grads

    exact = buckets and _buckets.padding_is_exact(model, objective, training)
    return _Entry(jax.jit(value_and_unscaled_grads), selected,
                  _buckets.Buckets() if exact else None)


def _connected(fn, args) -> list[bool]:
    """For each differentiated variable: does the objective depend on it at all?

    A forward dependency walk over the traced program; a nested call (pjit, custom_jvp) is
    treated as depending on all of its inputs, so the answer errs towards "connected".
    """
    jaxpr = fn.trace(*args).jaxpr.jaxpr  # a later fn(*args) reuses this trace
    n = len(args[0])
    deps: dict[Any, int] = {var: 1 << i for i, var in enumerate(jaxpr.invars[:n])}
    for eqn in jaxpr.eqns:
        mask = 0
        for var in eqn.invars:
            if not hasattr(var, "val"):  # a Var, not a Literal
                mask |= deps.get(var, 0)
        if mask:
            for var in eqn.outvars:
                deps[var] = mask
    out = jaxpr.outvars[1]  # fn returns ((scaled loss, loss), ...)
    mask = 0 if hasattr(out, "val") else deps.get(out, 0)
    return [bool(mask >> i & 1) for i in range(n)]


# --- Input and activation gradients (gradkit.input_gradients, gradkit.activation_gradients)

_AUX_CACHE: "weakref.WeakKeyDictionary[Any, _cache.BoundedCache]" = weakref.WeakKeyDictionary()


def compute_input_gradients(model, objective: Objective, batch: Batch, training: bool):
    """(loss, [gradient per leaf of batch.x]) of the objective w.r.t. the inputs."""
    k3.check_built(model)
    template = map_structure(lambda _: 0, batch.x)
    key = ("inputs", repr(template), objective.cache_key(), bool(training))
    per_model = _cache.per_model(_AUX_CACHE, model)
    if key not in per_model:
        per_model[key] = _build_input_fn(model, objective, training, template)
    loss, grads = per_model[key](leaves(batch.x), *k3.variable_values(model), batch.y,
                                 batch.sample_weight, np.float32(k3.loss_scale(model)))
    loss, grads = jax.device_get((loss, grads))
    return float(loss), list(grads)


def _objective_of_inputs(model_ref, objective, training, template):
    """objective(flat_x, trainable, non_trainable, metrics, y, sw, scale) -> (scaled, loss)."""

    def objective_of(flat, trainable, non_trainable, metrics, y, sample_weight, scale):
        feed = iter(flat)
        x = map_structure(lambda _: next(feed), template)
        loss = k3.objective_value(model_ref(), objective, training, trainable, non_trainable,
                                  metrics, x, y, sample_weight).astype("float32")
        return loss * scale, loss

    return objective_of


def _build_input_fn(model, objective, training, template):
    objective_of = _objective_of_inputs(
        weakref.ref(model), k3.prepare_objective(objective), training, template)

    def loss_and_input_grads(*args):
        (_, loss), grads = jax.value_and_grad(objective_of, has_aux=True)(*args)
        return loss, [g / args[-1].astype(g.dtype) for g in grads]

    return jax.jit(loss_and_input_grads)


class _TapEntry:
    def __init__(self, taps, fn, forward, with_perturbations):
        self.taps, self.fn, self.forward = taps, fn, forward
        self.with_perturbations = with_perturbations  # (zeros, *args) -> same as fn
        self.connected: list[bool] | None = None


def compute_activation_gradients(model, layers, keys, objective: Objective, batch: Batch,
                                 training: bool, return_activations: bool):
    """(loss, [gradient or None], [activation or None]) for the outputs of `layers`."""
    k3.check_built(model)
    template = map_structure(lambda _: 0, batch.x)
    key = ("activations", tuple(id(layer) for layer in layers), repr(template),
           objective.cache_key(), bool(training))
    per_model = _cache.per_model(_AUX_CACHE, model)
    if key not in per_model:
        per_model[key] = _build_activation_entry(model, layers, keys, objective, training,
                                                 template)
    entry = per_model[key]
    args = (leaves(batch.x), *k3.variable_values(model), batch.y, batch.sample_weight,
            np.float32(k3.loss_scale(model)))
    with entry.taps.installed():
        if entry.connected is None:
            entry.connected = _tapped_connected(entry, args)
        (_, loss), grads, outputs = entry.fn(*args)
    entry.taps.check()
    loss, grads = jax.device_get((loss, grads))
    outputs = jax.device_get(outputs) if return_activations else [None] * len(layers)
    return float(loss), [g if ok else None for g, ok in zip(grads, entry.connected)], outputs


def _tapped_connected(entry: _TapEntry, args: tuple) -> list[bool]:
    """Check the taps on an abstract forward pass, then which outputs reach the objective."""
    shapes = jax.eval_shape(entry.forward, *args[:-1])
    entry.taps.check()  # a shared, unused or non-float layer: raised before compiling
    zeros = [np.zeros(s.shape, s.dtype) for s in shapes]
    return _connected(jax.jit(entry.with_perturbations), (zeros, *args))


def _build_activation_entry(model, layers, keys, objective, training, template):
    taps = OutputTaps(layers, keys)
    objective_of = _objective_of_inputs(
        weakref.ref(model), k3.prepare_objective(objective), training, template)

    def forward(flat, trainable, non_trainable, metrics, y, sample_weight):
        outputs = _start_recording(taps, None)
        objective_of(flat, trainable, non_trainable, metrics, y, sample_weight, 1.0)
        return outputs

    def perturbed(perturbations, *args):
        outputs = _start_recording(taps, perturbations)
        scaled, loss = objective_of(*args)
        return scaled, (loss, outputs)

    def with_perturbations(zeros, *args):
        (scaled, (loss, outputs)), grads = jax.value_and_grad(perturbed, has_aux=True)(
            zeros, *args)
        return (scaled, loss), [g / args[-1].astype(g.dtype) for g in grads], outputs

    def loss_and_grads(*args):
        """Zero perturbations shaped like the outputs, made inside the compiled program."""
        shapes = jax.eval_shape(forward, *args[:-1])
        zeros = [jax.numpy.zeros(s.shape, s.dtype) for s in shapes]
        return with_perturbations(zeros, *args)

    return _TapEntry(taps, jax.jit(loss_and_grads), forward, with_perturbations)


def _start_recording(taps: OutputTaps, perturbations: list | None) -> list:
    """Start `taps` recording each output (plus its perturbation, if given); the record."""
    outputs = [None] * len(taps.layers)

    def tap(index, output):
        outputs[index] = output
        return output if perturbations is None else output + perturbations[index]

    taps.start(tap)
    return outputs
