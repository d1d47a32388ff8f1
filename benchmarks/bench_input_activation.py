"""Steady-state time of `input_gradients` and `activation_gradients` against hand-written code.

    python benchmarks/bench_input_activation.py [--flavours tensorflow,jax,torch,tf_keras]
                                                [--repeats 100] [--batch 256]

Model: the 784-512-512-10 MLP (relu, softmax) compiled with sparse categorical cross-entropy,
one batch of `--batch` examples. Each flavour runs in its own process. Baselines, written the
way a user would by hand, each returning NumPy:

- input: the gradient of the loss w.r.t. x (tensorflow / tf_keras: a `tf.function` with a
  GradientTape watching x; jax: `jax.jit(jax.grad)` over `model.stateless_call`; torch:
  `torch.autograd.grad` w.r.t. an x that requires grad);
- activation (the first Dense layer's output): the forward pass written layer by layer,
  differentiating w.r.t. that intermediate output (the same three recipes).

gradkit and the baseline run alternately (warm-up first, then the median of `--repeats`
rounds). Then gradkit is called once at each of 5 other batch sizes and the traces
(tensorflow, tf_keras: tracings of gradkit's cached tf.functions) or XLA compilations (jax)
those calls cause are counted; torch runs eagerly and never compiles.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    benchmark_parser,
    emit,
    interleaved,
    markdown_table,
    run_flavours,
    setup_flavour,
    tf_tracing_count,
)
from bench_gradients import build_model, jax_compile_counter  # noqa: E402

OTHER_SIZES = (1, 17, 100, 200, 255)


def main(argv: list[str]) -> int:
    args = benchmark_parser(__doc__, repeats=100, batch=256).parse_args(argv)
    if args.worker:
        emit(worker(args.worker, args.batch, args.repeats))
        return 0
    rows = []
    results, failed = run_flavours(__file__, args, ("batch", "repeats"))
    for flavour, r in results:
        for what in ("input", "activation"):
            base, ours = r[what]["baseline_ms"], r[what]["gradkit_ms"]
            rows.append([flavour, what, f"{base:.2f}", f"{ours:.2f}", f"{ours / base:.3f}",
                         f"{r[what]['max_rel_diff']:.1e}", r[what]["retraces"]])
    print(f"MLP 784-512-512-10, batch {args.batch}, median of {args.repeats} interleaved runs; "
          f"retraces over batch sizes {list(OTHER_SIZES)}\n")
    print(markdown_table(["flavour", "gradient", "baseline ms", "gradkit ms", "ratio",
                          "max rel diff", "retraces over 5 batch sizes"], rows))
    return 1 if failed else 0


def worker(flavour: str, batch: int, repeats: int) -> dict:
    keras = setup_flavour(flavour)
    import numpy as np

    import gradkit

    keras.utils.set_random_seed(0)
    model = build_model(keras)
    first = model.layers[0]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(max(batch, max(OTHER_SIZES)), 784)).astype("float32")
    y = rng.integers(0, 10, size=len(x)).astype("int32")
    xb, yb = x[:batch], y[:batch]
    input_base, act_base = BASELINES[flavour](keras, model)
    counter = COUNTERS[flavour]()
    ours = {
        "input": lambda xx, yy: gradkit.input_gradients(model, xx, yy),
        "activation": lambda xx, yy: next(iter(gradkit.activation_gradients(
            model, xx, yy, layers=first).values())),  # one layer: one key
    }
    result = {}
    for what, base in (("input", input_base), ("activation", act_base)):
        expected, got = base(xb, yb), ours[what](xb, yb)
        diff = float(np.max(np.abs(expected - got)) / (np.max(np.abs(expected)) + 1e-30))
        times = interleaved({"baseline": lambda b=base: b(xb, yb),
                             "gradkit": lambda w=what: ours[w](xb, yb)}, repeats)
        before = counter(model)
        for n in OTHER_SIZES:
            ours[what](x[:n], y[:n])
        retraces = "n/a (eager)" if before is None else counter(model) - before
        result[what] = {"baseline_ms": times["baseline"] * 1e3,
                        "gradkit_ms": times["gradkit"] * 1e3,
                        "max_rel_diff": diff, "retraces": retraces}
    return result


def tf_baselines(keras, model):
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    spec = [tf.TensorSpec([None, 784], tf.float32), tf.TensorSpec([None], tf.int32)]
    first, rest = model.layers[0], model.layers[1:]

    @tf.function(input_signature=spec)
    def input_step(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = loss_fn(y, model(x, training=False))
        return tape.gradient(loss, x)

    @tf.function(input_signature=spec)
    def activation_step(x, y):
        with tf.GradientTape() as tape:
            h = first(x)
            tape.watch(h)
            out = h
            for layer in rest:
                out = layer(out)
            loss = loss_fn(y, out)
        return tape.gradient(loss, h)

    return (lambda x, y: input_step(x, y).numpy(), lambda x, y: activation_step(x, y).numpy())


def jax_baselines(keras, model):
    import jax

    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    first, rest = model.layers[0], model.layers[1:]

    def values(layer):
        return [v.value for v in layer.trainable_variables]

    def input_loss(x, trainable, non_trainable, y):
        y_pred, _ = model.stateless_call(trainable, non_trainable, x, training=False)
        return loss_fn(y, y_pred)

    def tail_loss(h, tails, y):
        for layer, weights in zip(rest, tails):
            h, _ = layer.stateless_call(weights, [], h)
        return loss_fn(y, h)

    input_grad = jax.jit(jax.grad(input_loss))

    @jax.jit
    def activation_grad(x, head, tails, y):
        h, _ = first.stateless_call(head, [], x)
        return jax.grad(tail_loss)(h, tails, y)

    def run_input(x, y):
        non_trainable = [v.value for v in model.non_trainable_variables]
        return jax.device_get(input_grad(x, values(model), non_trainable, y))

    def run_activation(x, y):
        return jax.device_get(activation_grad(x, values(first), [values(l) for l in rest], y))

    return run_input, run_activation


def torch_baselines(keras, model):
    import torch

    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    first, rest = model.layers[0], model.layers[1:]

    def run_input(x, y):
        x = torch.from_numpy(x).requires_grad_(True)
        loss = loss_fn(torch.from_numpy(y), model(x, training=False))
        return torch.autograd.grad(loss, [x])[0].numpy()

    def run_activation(x, y):
        h = first(torch.from_numpy(x))
        out = h
        for layer in rest:
            out = layer(out)
        return torch.autograd.grad(loss_fn(torch.from_numpy(y), out), [h])[0].numpy()

    return run_input, run_activation


def tf_trace_counter():
    """Traces of gradkit's tf.functions for a model (TensorFlow and tf-keras alike)."""
    return tf_tracing_count


BASELINES = {"tensorflow": tf_baselines, "jax": jax_baselines, "torch": torch_baselines,
             "tf_keras": tf_baselines}
COUNTERS = {"tensorflow": tf_trace_counter,
            "jax": jax_compile_counter, "torch": lambda: (lambda model: None),
            "tf_keras": tf_trace_counter}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
