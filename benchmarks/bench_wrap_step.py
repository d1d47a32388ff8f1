"""Where a `transforms.wrap`-ped optimizer's time goes on TensorFlow: the compiled train step
alone, without `fit`'s data pipeline and callbacks.

    python benchmarks/bench_wrap_step.py [--flavours tensorflow,tf_keras] [--repeats 10]
                                         [--threads 1]

Model and batch of bench_wrap.py (784-512-512-10 MLP, batch 256, SGD(0.01)). Each variant's
``model.train_step`` on one fixed batch, in a ``tf.function``, 20 steps per sample, the
variants interleaved (order reversed every other round); medians over `--repeats` rounds of
the wall and process-CPU milliseconds per step:

- plain: ``SGD(0.01)``, no clipping;
- global_clipnorm: ``SGD(0.01, global_clipnorm=1.0)``, Keras' clipping;
- wrap(chain()): the step hook with an empty transform (the hook's own cost);
- wrap(clip): ``wrap(SGD(0.01), clip_by_global_norm(1.0))``;
- hand / hand+clip: a hand-written ``tf.function`` (tape, optional ``tf.clip_by_global_norm``,
  ``assign_sub``): what the clipping itself costs.

Also the op count of each variant's traced train step. ``--threads 1`` (the default) keeps
the figures steady on a shared machine; ``--threads 0`` lets TensorFlow choose.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, markdown_table, run_worker, setup_flavour  # noqa: E402
from bench_gradients import build_model  # noqa: E402

STEPS = 20


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavours", default="tensorflow,tf_keras")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        emit(worker(args.worker, args.repeats, args.threads))
        return 0
    load = os.getloadavg()[0]
    for flavour in [f for f in args.flavours.split(",") if f]:
        r = run_worker(os.path.abspath(__file__), flavour,
                       ["--repeats", str(args.repeats), "--threads", str(args.threads)],
                       threads=args.threads)
        if "error" in r:
            print(f"{flavour}: FAILED {r['error']}", file=sys.stderr)
            return 1
        print(f"\n{flavour}: train step on one batch of 256, ms per step, medians of "
              f"{args.repeats} rounds of {STEPS} steps, threads={args.threads or 'auto'}\n")
        print(markdown_table(["variant", "wall ms", "CPU ms", "graph ops"],
                             [[k, f"{v[0]:.2f}", f"{v[1]:.2f}", v[2]] for k, v in r.items()]))
    print(f"\nload average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    return 0


def worker(flavour: str, repeats: int, threads: int) -> dict:
    keras = setup_flavour(flavour, threads)
    import numpy as np
    import tensorflow as tf

    from gradkit import transforms as T

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(256, 784)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, size=256).astype("int32"))
    sgd = keras.optimizers.SGD
    optimizers = {
        "plain": lambda: sgd(0.01),
        "global_clipnorm": lambda: sgd(0.01, global_clipnorm=1.0),
        "wrap(chain())": lambda: T.wrap(sgd(0.01), T.chain()),
        "wrap(clip)": lambda: T.wrap(sgd(0.01), T.clip_by_global_norm(1.0)),
    }
    fns = {name: train_step(keras, tf, make()) for name, make in optimizers.items()}
    fns["hand"], fns["hand+clip"] = hand_step(keras, tf, False), hand_step(keras, tf, True)
    ops = {k: len(f.get_concrete_function(x, y).graph.get_operations()) for k, f in fns.items()}
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    names = list(fns)
    for round_ in range(repeats + 1):
        for name in names if round_ % 2 else names[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(STEPS):
                out = fns[name](x, y)
            tf.nest.flatten(out)[0].numpy()
            if round_:  # round 0 warms up
                wall[name].append((time.perf_counter() - start) / STEPS * 1e3)
                cpu[name].append((time.process_time() - start_cpu) / STEPS * 1e3)
    return {k: [statistics.median(wall[k]), statistics.median(cpu[k]), ops[k]] for k in names}


def train_step(keras, tf, optimizer):
    model = build_model(keras)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy())
    keras3 = hasattr(keras, "ops")
    return tf.function(lambda x, y: model.train_step((x, y, None) if keras3 else (x, y)))


def hand_step(keras, tf, clip: bool):
    model = build_model(keras)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    variables = model.trainable_variables

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, variables)
        if clip:
            grads, _ = tf.clip_by_global_norm(grads, 1.0)
        for v, g in zip(variables, grads):
            v.assign_sub(0.01 * g)
        return loss

    return step


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
