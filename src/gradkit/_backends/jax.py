"""JAX primitives for the Keras 3 engine: `jax.jit`, `jax.value_and_grad`, `jax.vmap`, `jax.jvp`.

XLA compiles one program per input shape. Where it is provably exact, `compile` pads a batch to
an already compiled batch size (gradkit._backends._buckets), so varying batch sizes do not
compile again. Variable values are read fresh on every call (`fit` donates their buffers).
`jax.grad` returns zeros, not None, for an argument the value does not use, so `grad` reads
which arguments are connected off the traced program (`reaching`), once per trace.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gradkit._backends import _buckets
from gradkit._backends import _keras3 as k3
from gradkit._backends.jax_pooling import fast_max_pooling
from gradkit._factors import Ops


def adapter():
    from gradkit._backends._engine import Engine

    return Engine(JaxPrimitives(), pad_chunks=True)


class JaxPrimitives:
    """The engine's verbs (gradkit._backends._engine.Primitives) in JAX."""

    ops = Ops(jnp.reshape, lambda x, dtype: x.astype(dtype),
              lambda parts: parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1))
    hazardous_ops: dict = {}
    slow_vectorized_convolutions = True  # 10x a loop on MobileNetV2

    def compile(self, fn: Callable, model: Any, *, donate: tuple = (), pad: Any = None):
        model_ref = weakref.ref(model)
        jitted = jax.jit(k3.seeded(pooled(fn, model_ref), model_ref),
                         donate_argnums=tuple(i + 1 for i in donate))
        exact = pad is not None and _buckets.padding_is_exact(model, *pad)
        buckets = [_buckets.Buckets()] if exact else []
        traced = []

        def call(data, scale, *extra):
            data = k3.seed_data(model_ref(), data)
            values = k3.variable_values(model_ref())
            if not traced:  # the first trace may create the compiled loss's metric
                jitted.trace(values, data, scale, *extra)  # variables: read them again
                traced.append(True)
                values = k3.variable_values(model_ref(), fresh=True)
            return jitted(values, data, scale, *extra)

        def run(data, scale, *extra):
            if buckets and _buckets.paddable(data):
                size = len(jax.tree_util.tree_leaves(data["x"])[0])
                try:
                    return call(_buckets.pad(data, buckets[0].size_for(size)), scale, *extra)
                except _buckets.PaddingNotExact:  # found while tracing: one program per shape
                    buckets.clear()
            return call(data, scale, *extra)

        return run

    def grad(self, f: Callable, *, taps: bool = False, shape_key: Any = None) -> Callable:
        def g(*args):
            zeros: list = []
            if taps:
                def record(*a):
                    seen: list = []
                    f(lambda z: seen.append(z) or z, *a)
                    return seen

                zeros = [jnp.zeros(s.shape, s.dtype) for s in jax.eval_shape(record, *args)]

            def h(zeros, *args):
                feed = iter(zeros)
                return f(lambda z: z + next(feed), *args)

            connected = reaching(h, (zeros, *args))
            (_, aux), grads = jax.value_and_grad(h, argnums=tuple(range(len(args) + 1)),
                                                 has_aux=True)(zeros, *args)
            masked = [[g if ok else None for g, ok in zip(grad, oks)]
                      for grad, oks in zip(grads, connected)]
            return aux, masked[1:], masked[0]

        return g

    def hvp(self, f: Callable) -> Callable:
        """Forward over reverse: the JVP of the gradient along the tangents."""
        def h(primals, tangents):
            def gradient(p):
                return jax.grad(lambda q: f(None, q), has_aux=True)(p)

            tangents = [t.astype(p.dtype) for p, t in zip(primals, tangents)]
            _, products, aux = jax.jvp(gradient, (primals,), (tangents,), has_aux=True)
            (connected,) = reaching(lambda p: f(None, p), (primals,))
            return aux, [hv if ok else None for hv, ok in zip(products, connected)]

        return h

    def linearize(self, f: Callable) -> Callable:
        """`jax.linearize` for J·tangents and its transpose for Jᵀ (one linearization)."""
        def lin(primals, tangents):
            tangents = [t.astype(p.dtype) for p, t in zip(primals, tangents)]
            outputs, jvp, aux = jax.linearize(f, primals, has_aux=True)
            transpose = jax.linear_transpose(jvp, primals)
            (connected,) = reaching(lambda p: sum(jnp.sum(o) for o in f(p)[0]), (primals,))

            def pullback(cotangents):
                (grads,) = transpose([c.astype(o.dtype) for c, o in zip(cotangents, outputs)])
                return [g if ok else None for g, ok in zip(grads, connected)]

            return outputs, jvp(tangents), aux, pullback

        return lin

    def vectorize(self, fn: Callable) -> Callable:
        return jax.vmap(fn)

    def map_examples(self, fn: Callable) -> Callable:
        """`fn` of one example run for each example in a loop compiled into the program."""
        return lambda data: jax.lax.map(fn, data)

    # array verbs for gradkit._backends._accumulator
    zeros, stack, where, all = staticmethod(jnp.zeros), staticmethod(jnp.stack), \
        staticmethod(jnp.where), staticmethod(jnp.all)
    sum, detached = staticmethod(jnp.sum), staticmethod(jax.lax.stop_gradient)

    def hazard(self, run) -> None:
        return None

    def all_finite(self, g):
        return jnp.all(jnp.isfinite(g))

    def to_numpy(self, x) -> np.ndarray:
        # np.asarray(x) is XLA's own buffer, read-only; results are the user's to change
        return np.array(x)

    def asynchronous(self, tensor) -> bool:
        return True  # dispatch is asynchronous: the host waits in groups

    def guard(self):
        return nullcontext()

    def distributed_sum(self, engine, request, batches, strategy):
        from gradkit._backends import jax_distributed

        return jax_distributed.distributed_sum(engine, request, batches, strategy)


def pooled(fn: Callable, model_ref: Any) -> Callable:
    """`fn` traced with the model's max pooling in its fast exact form (jax_pooling)."""
    def traced(*args):
        with fast_max_pooling(model_ref()):
            return fn(*args)

    return traced


def reaching(fn: Callable, args: tuple) -> list[list[bool]]:
    """For each array of each argument (a list of arrays): does fn's first output depend on
    it differentiably at all? A forward dependency walk over the traced program; a nested
    call (pjit, custom_jvp) counts as depending on all of its inputs, so the answer errs
    towards "yes"; an integer or boolean value carries no derivative, so the walk stops
    there (float token ids cast by an Embedding, a comparison), as TensorFlow's and torch's
    gradients do."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    deps: dict[Any, int] = {var: 1 << i for i, var in enumerate(jaxpr.invars)}
    for eqn in jaxpr.eqns:
        mask = 0
        for var in eqn.invars:
            if not hasattr(var, "val"):  # a Var, not a Literal
                mask |= deps.get(var, 0)
        if mask:
            for var in eqn.outvars:
                if jnp.issubdtype(var.aval.dtype, jnp.inexact):
                    deps[var] = mask
    out = jaxpr.outvars[0]
    mask = 0 if hasattr(out, "val") else deps.get(out, 0)
    found, position = [], 0
    for arg in args:
        found.append([bool(mask >> (position + i) & 1) for i in range(len(arg))])
        position += len(arg)
    return found
