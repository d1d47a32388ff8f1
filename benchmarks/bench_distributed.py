"""Two replicas against one: `gradkit.accumulate(strategy=...)` examples per second.

    python benchmarks/bench_distributed.py [--flavours tensorflow,jax,tf_keras]
                                           [--examples 60000] [--batch 256] [--repeats 3]

Model: a 784-512-512-10 MLP (relu, softmax) compiled with sparse categorical cross-entropy;
`--examples` random examples in batches of `--batch`. Each flavour runs in its own process
that makes two CPU devices before its framework starts (TensorFlow: two logical CPU
devices; JAX: `--xla_force_host_platform_device_count=2`) and times, alternately, one full
`accumulate` pass of:

- no strategy: the single-device accumulate (`strategy=None`);
- 1 replica: TF `MirroredStrategy(["/cpu:0"])`, JAX a one-device `Mesh`;
- 2 replicas: TF `MirroredStrategy(["/cpu:0", "/cpu:1"])`, JAX `"data_parallel"`.

Each TF setup has its own model built in its strategy's scope, with the same weights. A
warm-up on the first two batch shapes compiles every program first. Reported: the median
examples/s, the 2-replica speed-up over 1 replica, and the largest difference between the
2-replica and the single-device gradients relative to the largest gradient entry.

On a machine whose CPU devices share the same cores (both logical devices draw on one
thread pool) the honest speed-up is about 1x: replicas pay off with separate accelerators.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, interleaved, markdown_table, run_worker  # noqa: E402

FLAVOURS = ("tensorflow", "jax", "tf_keras")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavours", default=",".join(FLAVOURS))
    parser.add_argument("--examples", type=int, default=60000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    options = ["--examples", str(args.examples), "--batch", str(args.batch),
               "--repeats", str(args.repeats)]
    if args.worker:
        emit(worker(args.worker, args.examples, args.batch, args.repeats))
        return 0
    rows, failed = [], False
    for flavour in [f for f in args.flavours.split(",") if f]:
        r = run_worker(os.path.abspath(__file__), flavour, options)
        if "error" in r:
            print(f"{flavour}: FAILED {r['error']}", file=sys.stderr)
            failed = True
            continue
        rows.append([flavour, f"{r['none']:,.0f}", f"{r['one']:,.0f}", f"{r['two']:,.0f}",
                     f"{r['two'] / r['one']:.2f}x", f"{r['rel_diff']:.1e}"])
    print(f"accumulate over {args.examples} examples, batch {args.batch}, "
          f"median of {args.repeats} passes (examples/s)")
    print(markdown_table(["flavour", "no strategy", "1 replica", "2 replicas",
                          "2 vs 1", "max rel. diff"], rows))
    return 1 if failed else 0


def worker(flavour: str, examples: int, batch: int, repeats: int) -> dict:
    """Examples/s of each setup, timed alternately in this process."""
    keras, setups = _setups(flavour)
    import gradkit as gk

    rng = np.random.default_rng(0)
    x = rng.normal(size=(examples, 784)).astype("float32")
    y = rng.integers(0, 10, size=examples)
    warm = batch + examples % batch
    results = {}

    def run(name, data):
        model, strategy = setups[name]
        results[name] = gk.accumulate(model, data, batch_size=batch, strategy=strategy,
                                      progress=False)

    for name in setups:  # compile both batch shapes
        run(name, (x[:warm], y[:warm]))
    seconds = interleaved({name: (lambda n=name: run(n, (x, y))) for name in setups},
                          repeats=repeats, warmup=0)
    reference, two = results["none"], results["two"]
    scale = max(float(np.max(np.abs(g))) for g in reference.values())
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(two.values(), reference.values()))
    return {**{name: examples / s for name, s in seconds.items()}, "rel_diff": diff / scale}


def _setups(flavour: str):
    """(keras, {name: (model, strategy)}) on two devices of this CPU."""
    if flavour == "jax":
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import jax
        import keras

        model = _mlp(keras)
        one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
        return keras, {"none": (model, None), "one": (model, one),
                       "two": (model, "data_parallel")}
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    if flavour == "tf_keras":
        import tf_keras as keras
    else:
        import keras
    strategies = {"one": tf.distribute.MirroredStrategy(["/cpu:0"]),
                  "two": tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])}
    base = _mlp(keras)
    setups = {"none": (base, None)}
    for name, strategy in strategies.items():
        with strategy.scope():
            model = _mlp(keras)
        model.set_weights(base.get_weights())
        setups[name] = (model, strategy)
    return keras, setups


def _mlp(keras):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(loss="sparse_categorical_crossentropy", optimizer="sgd")
    return model


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
