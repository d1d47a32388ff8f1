"""Steady-state time of `gradkit.gradients` against a hand-written compiled baseline.

    python benchmarks/bench_gradients.py [--flavours tensorflow,jax,torch,tf_keras]
                                         [--repeats 200] [--batch 256] [--threads N]

Model: a 784-512-512-10 MLP (relu, softmax) compiled with sparse categorical cross-entropy,
one batch of `--batch` examples. Each flavour runs in its own process. Baselines, written the
way a user would by hand (both sides return every gradient as NumPy):

- tensorflow / tf_keras: a `tf.function` with a GradientTape over `model(x)` and the loss;
- jax: `jax.jit(jax.value_and_grad(...))` over `model.stateless_call` and the loss;
- torch: `torch.autograd.grad` over `model(x)` and the loss (eager, as Keras' torch trainer).

gradkit and the baseline run alternately (warm-up first, then `--repeats` rounds); the
table gives the median times, and the ratio is the median over rounds of gradkit/baseline
timed in the same round (robust to load that changes between rounds). Then gradkit is
called once at each of 10 other batch sizes, and the traces (tensorflow, tf_keras: tracings
of gradkit's cached tf.function) or XLA compilations (jax: every backend compilation in the
process) those calls cause are counted; torch runs eagerly and never compiles.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    benchmark_parser,
    emit,
    markdown_table,
    median,
    paired_ratio,
    run_flavours,
    samples,
    setup_flavour,
    tf_tracing_count,
    threads_label,
    timed,
)

OTHER_SIZES = (1, 3, 17, 32, 50, 100, 128, 177, 200, 255)


def main(argv: list[str]) -> int:
    args = benchmark_parser(__doc__, repeats=200, batch=256, threads=0).parse_args(argv)
    if args.worker:
        emit(worker(args.worker, args.batch, args.repeats, args.threads))
        return 0
    rows = []
    results, failed = run_flavours(__file__, args, ("batch", "repeats", "threads"))
    for flavour, r in results:
        rows.append([flavour, f"{r['baseline_ms']:.2f}", f"{r['gradkit_ms']:.2f}",
                     f"{r['ratio']:.3f}", r["retraces"]])
        print(f"{flavour}: max relative difference to the baseline {r['max_rel_diff']:.1e}; "
              f"first call at a new batch size: baseline {r['new_shape_ms']:.0f} ms",
              file=sys.stderr)
    threads = threads_label(args.threads)
    print(f"MLP 784-512-512-10, batch {args.batch}, median of {args.repeats} interleaved runs, "
          f"{threads}; retraces over batch sizes {list(OTHER_SIZES)}\n")
    print(markdown_table(
        ["flavour", "baseline ms", "gradkit ms", "ratio", "retraces over 10 batch sizes"], rows))
    return 1 if failed else 0


def build_model(keras):
    layers = keras.layers
    model = keras.Sequential([
        keras.Input(shape=(784,)),
        layers.Dense(512, activation="relu"),
        layers.Dense(512, activation="relu"),
        layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    return model


def worker(flavour: str, batch: int, repeats: int, threads: int) -> dict:
    keras = setup_flavour(flavour, threads)
    import numpy as np

    import gradkit

    keras.utils.set_random_seed(0)
    model = build_model(keras)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(max(batch, max(OTHER_SIZES)) + 1, 784)).astype("float32")
    y = rng.integers(0, 10, size=len(x)).astype("int32")
    xb, yb = x[:batch], y[:batch]
    baseline = BASELINES[flavour](keras, model)
    counter = COUNTERS[flavour]()

    def ours():
        return list(gradkit.gradients(model, xb, yb).values())

    expected, got = baseline(xb, yb), ours()
    diff = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-30))
               for a, b in zip(expected, got))
    times = samples({"baseline": lambda: baseline(xb, yb), "gradkit": ours}, repeats)
    ratio = paired_ratio(times["gradkit"], times["baseline"])
    before = counter(model)
    for n in OTHER_SIZES:
        gradkit.gradients(model, x[:n], y[:n])
    retraces = "n/a (eager)" if before is None else counter(model) - before
    new_shape = timed(lambda: baseline(x[:batch + 1], y[:batch + 1]))
    return {"baseline_ms": median(times["baseline"]) * 1e3,
            "gradkit_ms": median(times["gradkit"]) * 1e3, "ratio": ratio,
            "retraces": retraces, "max_rel_diff": diff, "new_shape_ms": new_shape * 1e3}


def tf_baseline(keras, model):
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    variables = model.trainable_variables

    @tf.function(input_signature=[tf.TensorSpec([None, 784], tf.float32),
                                  tf.TensorSpec([None], tf.int32)])
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=False))
        return tape.gradient(loss, variables)

    return lambda x, y: [g.numpy() for g in step(x, y)]


def jax_baseline(keras, model):
    import jax

    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    def objective(trainable, non_trainable, x, y):
        y_pred, _ = model.stateless_call(trainable, non_trainable, x, training=False)
        return loss_fn(y, y_pred)

    step = jax.jit(jax.value_and_grad(objective))

    def run(x, y):
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        _, grads = step(trainable, non_trainable, x, y)
        return jax.device_get(grads)

    return run


def torch_baseline(keras, model):
    import torch

    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    def run(x, y):
        loss = loss_fn(torch.from_numpy(y), model(torch.from_numpy(x), training=False))
        grads = torch.autograd.grad(loss, [v.value for v in model.trainable_variables])
        return [g.numpy() for g in grads]

    return run


def tf_trace_counter():
    """Traces of gradkit's tf.functions for a model (TensorFlow and tf-keras alike)."""
    return tf_tracing_count


def jax_compile_counter():
    import jax

    count = [0]

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    return lambda model: count[0]


BASELINES = {"tensorflow": tf_baseline, "jax": jax_baseline, "torch": torch_baseline,
             "tf_keras": tf_baseline}
COUNTERS = {"tensorflow": tf_trace_counter, "jax": jax_compile_counter,
            "torch": lambda: (lambda model: None), "tf_keras": tf_trace_counter}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
