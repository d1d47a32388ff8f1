"""Two replicas against one: `gradkit.accumulate(strategy=...)` examples per second.

    python benchmarks/bench_distributed.py [--flavours tensorflow,jax,tf_keras,torch]
                                           [--examples 60000] [--batch 256] [--repeats 3]

Model: a 784-512-512-10 MLP (relu, softmax) compiled with sparse categorical cross-entropy;
`--examples` random examples in batches of `--batch`. Each flavour runs in its own process
that makes two CPU devices before its framework starts (TensorFlow: two logical CPU
devices; JAX: `--xla_force_host_platform_device_count=2`) and times, alternately, one full
`accumulate` pass of:

- no strategy: the single-device accumulate (`strategy=None`);
- 1 replica: TF `MirroredStrategy(["/cpu:0"])`, JAX a one-device `Mesh`;
- 2 replicas: TF `MirroredStrategy(["/cpu:0", "/cpu:1"])`, JAX `"data_parallel"`.

torch has no devices to make: its row is two gloo processes (torch.distributed, loopback).
The worker is rank 0 and starts rank 1; "no strategy" and "1 replica" (a one-member group,
`new_group([0])`, the same collective code path) run on rank 0 alone, and "2 replicas" is
both processes, each with half the examples (the first and second halves), timed on rank 0
from a barrier to its result (the final all-reduce waits for rank 1). Every process runs
one compute thread (`torch.set_num_threads(1)`), so the row measures scaling over
processes, not over threads (on a loaded machine, two OpenMP threads in one process wait
for each other: a single process with 2 threads ran ~10x slower here than with 1).

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

from _common import (  # noqa: E402
    benchmark_parser,
    emit,
    interleaved,
    markdown_table,
    run_flavours,
)


def main(argv: list[str]) -> int:
    parser = benchmark_parser(__doc__, examples=60000, batch=256, repeats=3)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    options = ["--examples", str(args.examples), "--batch", str(args.batch),
               "--repeats", str(args.repeats)]
    if args.worker == "torch":
        result = torch_worker(args.rank, args.port, options)
        if args.rank == 0:
            emit(result)
        return 0
    if args.worker:
        emit(worker(args.worker, args.examples, args.batch, args.repeats))
        return 0
    rows = []
    results, failed = run_flavours(__file__, args, ("examples", "batch", "repeats"))
    for flavour, r in results:
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


def torch_worker(rank: int, port: str | None, options: list[str]) -> dict:
    """Rank 0 starts rank 1; both run the same rounds of timed passes (see the docstring)."""
    import random
    import socket
    import subprocess
    import time

    args = dict(zip(options[::2], map(int, options[1::2])))
    examples, batch, repeats = args["--examples"], args["--batch"], args["--repeats"]
    if rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        helper = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                                   "torch", "--rank", "1", "--port", port, *options])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2)
    alone = dist.new_group([0])  # every process takes part in making it
    import keras

    import gradkit as gk

    torch.set_num_threads(1)
    model = _mlp(keras)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(examples, 784)).astype("float32")
    y = rng.integers(0, 10, size=examples)
    half = slice(0, examples // 2) if rank == 0 else slice(examples // 2, examples)
    setups = {"none": (None, slice(None)), "one": (alone, slice(None)),
              "two": ("torch.distributed", half)}
    seconds: dict = {name: [] for name in setups}
    results = {}
    for round_ in range(repeats + 1):  # the first round warms up
        order = list(setups)
        random.Random(round_).shuffle(order)  # the same order on both processes
        for name in order:
            strategy, part = setups[name]
            dist.barrier()
            if rank == 1 and name != "two":
                continue
            start = time.perf_counter()
            results[name] = gk.accumulate(model, (x[part], y[part]), batch_size=batch,
                                          strategy=strategy, progress=False)
            if round_:
                seconds[name].append(time.perf_counter() - start)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 1:
        return {}
    helper.wait()
    reference, two = results["none"], results["two"]
    scale = max(float(np.max(np.abs(g))) for g in reference.values())
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(two.values(), reference.values()))
    return {**{name: examples / float(np.median(s)) for name, s in seconds.items()},
            "rel_diff": diff / scale}


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
