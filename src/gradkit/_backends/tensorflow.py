"""TensorFlow primitives: GradientTape, `tf.function` with an open batch axis, pfor.

Used by the Keras 3 engine on the TensorFlow backend (`adapter()`) and by the tf-keras
adapter; this module never imports Keras. A compiled function is traced once per input
signature with the batch axis left open (None), so a new batch size does not retrace.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from contextlib import nullcontext
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from gradkit._data import map_structure
from gradkit._factors import Ops


_ENTRIES = itertools.count()
#: Examples `map_examples` runs at once (tf.map_fn's parallel_iterations)
MAP_PARALLEL = 4


def adapter():
    """The Keras 3 engine over these primitives."""
    from gradkit._backends import _keras3
    from gradkit._backends._engine import Engine

    return Engine(TensorFlowPrimitives(values=_keras3.variable_values,
                                       seeding=(_keras3.seed_data, _keras3.seeded)))


class TensorFlowPrimitives:
    """The engine's verbs (gradkit._backends._engine.Primitives) in TensorFlow."""

    ops = Ops(tf.reshape, tf.cast,
              lambda parts: parts[0] if len(parts) == 1 else tf.concat(parts, axis=1))
    #: What pfor does with these ops: crashes the process or returns wrong rows with oneDNN
    #: (TF 2.21: the kernel gradient of EinsumDense, so MultiHeadAttention), or fails after a
    #: long trace (the TensorArrays of recurrent layers' while loops)
    hazardous_ops = {
        "Einsum": "tf.vectorized_map over it crashes or returns wrong rows with TensorFlow's "
                  "oneDNN kernels",
        "While": "tf.vectorized_map cannot convert while loops over TensorArrays",
        "StatelessWhile": "tf.vectorized_map cannot convert while loops over TensorArrays",
    }
    #: the vectorizer forms per-example convolution kernels as grouped convolutions (on a
    #: customized-conv model 0.39 ms an example, tf.map_fn 0.38)
    slow_vectorized_convolutions = True

    def __init__(self, values: Callable[[Any], Any], seeding: tuple) -> None:
        self.values = values  # model -> the values the compiled functions get
        # (host: data with its seed as rows, traced: fn taking them; see gradkit._seeds)
        self.seed_data, self.seeded = seeding

    def compile(self, fn: Callable, model: Any, *, donate: tuple = (), pad: Any = None):
        model_ref, read, traced = weakref.ref(model), self.values, {}
        fn = self.seeded(fn, model_ref)

        def with_values(*args):
            return fn(read(model_ref()), *args)

        # TensorFlow warns about "retracing" per code object (compared by value): a name of
        # its own for each compiled entry, which is traced once per signature
        with_values.__code__ = with_values.__code__.replace(
            co_name=f"gradkit_{fn.__name__}_{next(_ENTRIES)}")

        concrete: dict = {}  # its concrete function: a call skips tf.function's dispatch

        def run(data, scale, *extra):
            # converted here, the call binds tensors: about 0.3 ms less than binding NumPy
            data = map_structure(tf.convert_to_tensor, self.seed_data(model_ref(), data))
            scale = tf.convert_to_tensor(scale, tf.float32)
            signature = [map_structure(relaxed_spec, data), tf.TensorSpec([], tf.float32),
                         *(map_structure(exact_spec, e) for e in extra)]
            key = repr(signature)
            if key not in traced:
                traced[key] = tf.function(with_values, input_signature=signature)
                concrete[key] = traced[key].get_concrete_function()
            return concrete[key](data, scale, *extra)

        run.functions = traced  # one tf.function per input signature (for retrace checks)
        return run

    def grad(self, f: Callable, *, taps: bool = False, shape_key: Any = None) -> Callable:
        def g(*args):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                args = [[watchable(a) for a in arg] for arg in args]
                for arg in args:
                    tape.watch(arg)
                zeros: list = []

                def perturb(z):
                    zero = tf.zeros_like(z)
                    tape.watch(zero)
                    zeros.append(zero)
                    return z + zero

                value, aux = f(perturb, *args)
            arg_grads, tap_grads = tape.gradient(value, (args, zeros))
            return aux, [dense(grads) for grads in arg_grads], dense(tap_grads)

        return g

    def hvp(self, f: Callable) -> Callable:
        """Reverse over reverse: the gradient of ⟨∇f, tangents⟩."""
        def h(primals, tangents):
            with tf.GradientTape(watch_accessed_variables=False) as outer:
                primals = [watchable(p) for p in primals]
                outer.watch(primals)
                with tf.GradientTape(watch_accessed_variables=False) as inner:
                    inner.watch(primals)
                    value, aux = f(None, primals)
                grads = dense(inner.gradient(value, primals))
                pairs = [(g, tf.cast(t, g.dtype)) for g, t in zip(grads, tangents)
                         if g is not None]
                inner_product = tf.add_n([tf.reduce_sum(g * t) for g, t in pairs]) \
                    if pairs else tf.constant(0.0)
            products = dense(outer.gradient(inner_product, primals))
            return aux, [None if g is None else (tf.zeros_like(p) if hv is None else hv)
                         for g, hv, p in zip(grads, products, primals)]

        return h

    def linearize(self, f: Callable) -> Callable:
        """Double reverse: J·tangents = ∇_r ⟨Jᵀ r, tangents⟩ (Jᵀ r is linear in r), on one
        recorded forward pass that also serves the pullback. (ForwardAccumulator, forward
        mode proper, fails on the while loops of recurrent layers.)"""
        def lin(primals, tangents):
            primals = [watchable(p) for p in primals]
            with tf.GradientTape(watch_accessed_variables=False, persistent=True) as tape:
                tape.watch(primals)
                outputs, aux = f(primals)
            with tf.GradientTape(watch_accessed_variables=False) as outer:
                probes = [tf.zeros_like(o) for o in outputs]
                outer.watch(probes)
                pulled = dense(tape.gradient(outputs, primals, output_gradients=probes))
                pairs = [tf.reduce_sum(g * tf.cast(t, g.dtype))
                         for g, t in zip(pulled, tangents) if g is not None]
                inner = tf.add_n(pairs) if pairs else tf.constant(0.0)
            jvps = outer.gradient(inner, probes,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)

            def pullback(cotangents):
                return dense(tape.gradient(outputs, primals, output_gradients=cotangents))

            return outputs, dense(jvps), aux, pullback

        return lin

    def vectorize(self, fn: Callable) -> Callable:
        def run(data):
            tf_logger = logging.getLogger("tensorflow")
            level = tf_logger.level  # pfor logs every op it cannot convert; the caller
            tf_logger.setLevel(logging.CRITICAL)  # reports the error it raises, once
            try:
                return tf.vectorized_map(fn, data)
            finally:
                tf_logger.setLevel(level)

        return run

    def map_examples(self, fn: Callable) -> Callable:
        """`fn` of one example run for each example in a `tf.map_fn` loop of the compiled
        graph (no pfor: no converter gaps, no oneDNN hazards). `fn` is traced once, as a
        function of its own, whose outputs give the loop's signature."""
        def run(data):
            one = tf.function(fn, autograph=False)
            element = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape[1:], t.dtype), data)
            outputs = one.get_concrete_function(element).structured_outputs
            signature = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), outputs)
            return tf.map_fn(one, data, fn_output_signature=signature,
                             parallel_iterations=MAP_PARALLEL)

        return run

    def hazard(self, run) -> str | None:
        for fn in run.functions.values():
            graph = fn.get_concrete_function().graph.as_graph_def()
            nodes = [*graph.node, *(n for f in graph.library.function for n in f.node_def)]
            for node in nodes:
                if node.op in self.hazardous_ops:
                    return f"op {node.op} at {node.name!r}: {self.hazardous_ops[node.op]}"
        return None

    # array verbs for gradkit._backends._accumulator
    zeros, stack, where, all = staticmethod(tf.zeros), staticmethod(tf.stack), \
        staticmethod(tf.where), staticmethod(tf.reduce_all)
    sum, detached = staticmethod(tf.reduce_sum), staticmethod(tf.stop_gradient)

    def all_finite(self, g):
        return tf.reduce_all(tf.math.is_finite(g))

    def to_numpy(self, x) -> np.ndarray:
        return x.numpy()

    def asynchronous(self, tensor) -> bool:
        return not tensor.device.endswith("CPU:0")  # eager TF is synchronous on CPU

    def guard(self):
        return nullcontext()

    def distributed_sum(self, adapter, request, batches, strategy):
        from gradkit._backends import tf_distribute

        return tf_distribute.distributed_sum(adapter, request, batches, strategy)


def watchable(value):
    """A tensor of its own to watch (a variable is watched as itself)."""
    return value if isinstance(value, tf.Variable) else tf.identity(value)


def dense(grads: list) -> list:
    """Gradients as dense tensors (an Embedding's come as IndexedSlices); None kept."""
    return [None if g is None else tf.convert_to_tensor(g) for g in grads]


def relaxed_spec(value: Any) -> tf.TensorSpec:
    """The spec of `value` with the batch axis open; NumPy arrays are not copied to read it."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        shape, dtype = value.shape, tf.as_dtype(value.dtype)
    else:
        tensor = value if isinstance(value, tf.Tensor) else tf.convert_to_tensor(value)
        shape, dtype = tensor.shape, tensor.dtype
    return tf.TensorSpec([None, *shape[1:]] if len(shape) else [], dtype)


def exact_spec(value: Any) -> tf.TensorSpec:
    tensor = value if isinstance(value, (tf.Tensor, tf.Variable)) else tf.convert_to_tensor(value)
    return tf.TensorSpec(tensor.shape, tensor.dtype)
