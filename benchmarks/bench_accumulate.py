"""Throughput and memory of `gradkit.accumulate` against one epoch of `model.fit`.

    python benchmarks/bench_accumulate.py [--flavours tensorflow,jax,torch,tf_keras]
                                          [--examples 60000] [--batch 256] [--rounds 3]

Model: a 784-512-512-10 MLP (relu, softmax) compiled with SGD and sparse categorical
cross-entropy; data: random MNIST-shaped NumPy arrays (`--examples` rows), batch `--batch`.

Speed (one fresh process per flavour): after a warm-up of both on a few batches (compiling
every batch shape), `model.fit(x, y, epochs=1, shuffle=False)` (which also applies the
updates) and `gk.accumulate(model, (x, y), batch_size=...)` each pass once over the same
arrays, alternately (which goes first alternating too), `--rounds` times; the best pass of
each gives examples/s (the machine is shared, so the best pass is the least disturbed one).
Ratio = accumulate / fit (target >= 1).

Memory (two more fresh processes per flavour): `accumulate` over a generator of random
batches (no dataset held in memory) of N = `--examples` // 10 and of 10 N examples; peak RSS
(ru_maxrss) of each whole process, imports and compilation included. Ratio = 10N / N
(target <= 1.10: memory does not grow with the number of batches).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    benchmark_parser,
    emit,
    markdown_table,
    peak_rss_mib,
    run_worker,
    setup_flavour,
)


def main(argv: list[str]) -> int:
    parser = benchmark_parser(__doc__, examples=60000, batch=256, rounds=3)
    parser.add_argument("--mode", default="speed", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run = speed_worker if args.mode == "speed" else memory_worker
        emit(run(args.worker, args.examples, args.batch, args.rounds))
        return 0
    rows, failed = [], False
    script = os.path.abspath(__file__)
    small = max(args.examples // 10, args.batch)
    for flavour in [f for f in args.flavours.split(",") if f]:
        common = ["--batch", str(args.batch), "--rounds", str(args.rounds)]
        speed = run_worker(script, flavour, ["--examples", str(args.examples), *common])
        mem_n = run_worker(script, flavour, ["--mode", "memory", "--examples", str(small),
                                             *common])
        mem_10n = run_worker(script, flavour, ["--mode", "memory",
                                               "--examples", str(10 * small), *common])
        errors = [r["error"] for r in (speed, mem_n, mem_10n) if "error" in r]
        if errors:
            print(f"{flavour}: FAILED {errors[0]}", file=sys.stderr)
            failed = True
            continue
        rows.append([
            flavour, f"{speed['fit']:,.0f}", f"{speed['accumulate']:,.0f}",
            f"{speed['accumulate'] / speed['fit']:.2f}x",
            f"{mem_n['peak_mib']:,.0f}", f"{mem_10n['peak_mib']:,.0f}",
            f"{mem_10n['peak_mib'] / mem_n['peak_mib']:.3f}",
        ])
        print(f"{flavour}: {speed} {mem_n} {mem_10n}", file=sys.stderr, flush=True)
    print(f"784-512-512-10 MLP, {args.examples:,} examples, batch {args.batch}, best of "
          f"{args.rounds} passes; memory: accumulate over {small:,} vs {10 * small:,} "
          "generated examples.\n")
    print(markdown_table(
        ["flavour", "fit examples/s", "accumulate examples/s", "ratio",
         f"peak RSS {small:,} (MiB)", f"peak RSS {10 * small:,} (MiB)", "RSS ratio"], rows))
    return 1 if failed else 0


def _model(keras):
    model = keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    return model


def _data(n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n).astype("int32")


def speed_worker(flavour: str, examples: int, batch: int, rounds: int) -> dict:
    keras = setup_flavour(flavour)
    import gradkit as gk

    model = _model(keras)
    x, y = _data(examples)
    tail = examples % batch or batch  # warm up the last, smaller batch shape as well
    wx, wy = x[:2 * batch + tail], y[:2 * batch + tail]
    model.fit(wx, wy, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    gk.accumulate(model, (wx, wy), batch_size=batch, progress=False)
    best = {"fit": float("inf"), "accumulate": float("inf")}
    passes = {
        "accumulate": lambda: gk.accumulate(model, (x, y), batch_size=batch, progress=False),
        "fit": lambda: model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0),
    }
    for r in range(rounds):
        for name in sorted(passes, reverse=bool(r % 2)):  # alternate which goes first
            start = time.perf_counter()
            passes[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: examples / seconds for name, seconds in best.items()}


def memory_worker(flavour: str, examples: int, batch: int, rounds: int) -> dict:
    keras = setup_flavour(flavour)
    import numpy as np

    import gradkit as gk

    model = _model(keras)
    rng = np.random.default_rng(1)

    def batches():
        for start in range(0, examples, batch):
            n = min(batch, examples - start)
            yield (rng.random((n, 784), dtype=np.float32),
                   rng.integers(0, 10, n).astype("int32"))

    start = time.perf_counter()
    grads = gk.accumulate(model, batches(), progress=False)
    seconds = time.perf_counter() - start
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    return {"examples": examples, "peak_mib": peak_rss_mib(), "seconds": seconds}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
