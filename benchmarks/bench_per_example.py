"""Per-example gradients and norms: time and peak memory against hand-written baselines.

    python benchmarks/bench_per_example.py [--flavours tensorflow,jax,torch,tf_keras]
                                           [--batch 64] [--repeats 10]

Model: the 784-512-512-10 MLP of bench_gradients.py (P = 669,706 weights), one batch of
`--batch` examples. Each flavour runs in its own process. Baselines, written by hand:

- vectorized_map (tensorflow, tf_keras): a `tf.function` running `tf.vectorized_map` over a
  per-example GradientTape of `model(x[None])` and the loss, every gradient to NumPy;
- loop (every flavour): a Python loop over the examples calling bench_gradients.py's compiled
  single-batch gradient (tf.function / jax.jit / torch autograd) on each, then `np.stack`;
- batch gradient (for the norms): that same compiled gradient on the whole batch.

Times are medians of `--repeats` rounds in random order after a warm-up (the norms and the
batch gradient: 5 x `--repeats` rounds of their own). "write floor" is the time of one write
of the B x P float32 result into new memory by one thread per core, which no per-example
method returning that result can beat. Peak memory is the rise of the process's resident set
(VmHWM, reset through /proc/self/clear_refs) during one warm call, result included; its floor
is the same np.ones.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    FLAVOURS,
    emit,
    interleaved,
    markdown_table,
    run_worker,
    setup_flavour,
)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavours", default=",".join(FLAVOURS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        emit(worker(args.worker, args.batch, args.repeats))
        return 0
    time_rows, memory_rows, failed = [], [], False
    for flavour in [f for f in args.flavours.split(",") if f]:
        r = run_worker(os.path.abspath(__file__), flavour,
                       ["--batch", str(args.batch), "--repeats", str(args.repeats)])
        if "error" in r:
            print(f"{flavour}: FAILED {r['error']}", file=sys.stderr)
            failed = True
            continue
        time_rows.append(_time_row(flavour, r))
        memory_rows.append(_memory_row(flavour, r))
        print(f"{flavour}: max relative difference to the loop {r['max_rel_diff']:.1e}, "
              f"norms vs materialized {r['norm_rel_diff']:.1e}", file=sys.stderr)
    print(f"MLP 784-512-512-10, batch {args.batch}; medians of {args.repeats} rounds in random "
          "order (ms)\n")
    print(markdown_table(
        ["flavour", "per-example", "write floor", "vectorized_map", "ratio", "loop", "ratio",
         "norms", "batch grad", "ratio"], time_rows))
    print("\nPeak resident memory rise during one call (MiB); floor = one write of the "
          "B x P float32 result\n")
    print(markdown_table(
        ["flavour", "floor", "per-example", "/ floor", "chunk_size=16", "result + chunk",
         "norms", "norms at 4 x B"], memory_rows))
    return 1 if failed else 0


def _time_row(flavour: str, r: dict) -> list:
    vmap = r.get("vmap_ms")
    return [flavour, f"{r['ours_ms']:.1f}", f"{r['floor_ms']:.1f}",
            "-" if vmap is None else f"{vmap:.1f}",
            "-" if vmap is None else f"{r['ours_ms'] / vmap:.2f}",
            f"{r['loop_ms']:.1f}", f"{r['ours_ms'] / r['loop_ms']:.2f}",
            f"{r['norms_ms']:.1f}", f"{r['batch_ms']:.1f}", f"{r['norms_ms'] / r['batch_ms']:.2f}"]


def _memory_row(flavour: str, r: dict) -> list:
    return [flavour, f"{r['floor_mib']:.0f}", f"{r['ours_mib']:.0f}",
            f"{r['ours_mib'] / r['floor_mib']:.2f}", f"{r['chunked_mib']:.0f}",
            f"{r['chunk_budget_mib']:.0f}", f"{r['norms_mib']:.0f}", f"{r['norms4_mib']:.0f}"]


def worker(flavour: str, batch: int, repeats: int) -> dict:
    keras = setup_flavour(flavour)
    import numpy as np
    from bench_gradients import BASELINES, build_model

    import gradkit

    keras.utils.set_random_seed(0)
    model = build_model(keras)
    rng = np.random.default_rng(0)
    x4 = rng.normal(size=(4 * batch, 784)).astype("float32")
    y4 = rng.integers(0, 10, size=4 * batch).astype("int32")
    x, y = x4[:batch], y4[:batch]
    single = BASELINES[flavour](keras, model)

    def ours():
        return list(gradkit.per_example_gradients(model, x, y).values())

    def loop():
        rows = [single(x[i:i + 1], y[i:i + 1]) for i in range(batch)]
        return [np.stack([row[j] for row in rows]) for j in range(len(rows[0]))]

    size = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    fns = {"ours": ours, "loop": loop, "floor": parallel_write(np, batch, size),
           "norms": lambda: gradkit.per_example_norms(model, x, y),
           "batch": lambda: single(x, y)}
    if flavour in ("tensorflow", "tf_keras"):
        fns["vmap"] = vectorized_map_baseline(keras, model, x, y)
    result = _accuracy(fns, np)
    small = ("norms", "batch")  # timed apart: a 164 MiB write between them would dominate
    for group, rounds in (([k for k in fns if k not in small], repeats), (small, 5 * repeats)):
        times = interleaved({k: fns[k] for k in group}, rounds, warmup=2)
        result.update({f"{k}_ms": v * 1e3 for k, v in times.items()})
    result.update(_memory(gradkit, model, x, y, x4, y4, np))
    return result


def _accuracy(fns: dict, np) -> dict:
    ours, loop = fns["ours"](), fns["loop"]()
    diff = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
               for a, b in zip(ours, loop))
    materialized = np.sqrt(sum((g.reshape(len(g), -1).astype("float64") ** 2).sum(1)
                               for g in ours))
    norm_diff = float(np.max(np.abs(fns["norms"]() - materialized) / materialized))
    if "vmap" in fns:
        diff = max(diff, max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
                             for a, b in zip(fns["vmap"](), loop)))
    return {"max_rel_diff": diff, "norm_rel_diff": norm_diff}


def _memory(gradkit, model, x, y, x4, y4, np) -> dict:
    size = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    mib = 2.0**20
    gradkit.per_example_gradients(model, x, y, chunk_size=16)  # warm: compiled for 16 rows
    gradkit.per_example_norms(model, x4, y4)
    return {  # the norms first: no per-example result has been allocated at full size yet
        "norms_mib": peak_rise(lambda: gradkit.per_example_norms(model, x, y)) / mib,
        "norms4_mib": peak_rise(lambda: gradkit.per_example_norms(model, x4, y4)) / mib,
        "floor_mib": peak_rise(lambda: np.ones((len(x), size), np.float32)) / mib,
        "chunked_mib": peak_rise(
            lambda: gradkit.per_example_gradients(model, x, y, chunk_size=16)) / mib,
        "chunk_budget_mib": (len(x) + 16) * size * 4 / mib,
        "ours_mib": peak_rise(lambda: gradkit.per_example_gradients(model, x, y)) / mib,
    }


def parallel_write(np, batch: int, size: int):
    """The write floor: a (batch, size) float32 array of ones in new memory, filled in row
    blocks by one thread per core (one thread alone cannot reach the memory bandwidth)."""
    workers = len(os.sched_getaffinity(0))
    pool = ThreadPoolExecutor(workers)
    step = -(-batch // (4 * workers))

    def write():
        out = np.empty((batch, size), np.float32)
        list(pool.map(lambda start: out[start:start + step].fill(1.0),
                      range(0, batch, step)))
        return out

    return write


def peak_rise(fn) -> float:
    """Bytes the resident set rises above its level before `fn` while `fn` runs (Linux).

    Freed heap memory is handed back to the system first (malloc_trim), so memory an earlier
    call left in the allocator's free lists does not hide this call's allocations.
    """
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return (peak - before) * 1024.0


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def vectorized_map_baseline(keras, model, x, y):
    """The best plain TensorFlow recipe: tf.vectorized_map over a per-example tape."""
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    variables = model.trainable_variables

    @tf.function(input_signature=[tf.TensorSpec([None, 784], tf.float32),
                                  tf.TensorSpec([None], tf.int32)])
    def step(xb, yb):
        def one(example):
            xi, yi = example
            with tf.GradientTape() as tape:
                loss = loss_fn(yi[None], model(xi[None], training=False))
            return tape.gradient(loss, variables)

        return tf.vectorized_map(one, (xb, yb))

    return lambda: [g.numpy() for g in step(x, y)]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
