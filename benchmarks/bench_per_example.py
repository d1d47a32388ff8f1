"""Per-example gradients and norms: time and peak memory against hand-written baselines.

    python benchmarks/bench_per_example.py [--flavours tensorflow,jax,torch,tf_keras]
                                           [--batch 64] [--repeats 10]

Model: the 784-512-512-10 MLP of bench_gradients.py (P = 669,706 weights), one batch of
`--batch` examples. Each flavour runs in its own process. gradkit is timed twice:
`per_example_gradients(model, x, y)` (default: a new result each call) and the same call with
`out=buffers`, an earlier result reused (the rows are written into the caller's arrays).
Baselines, written by hand:

- best recipe (tensorflow, tf_keras): a `tf.function` running `tf.vectorized_map` over a
  per-example GradientTape of `model(x[None])` and the loss, every gradient to NumPy, traced
  at the batch's own static shape (no input_signature), as a TensorFlow user would write it
  for a fixed batch. Two variants are timed, plain and `jit_compile=True` (XLA); the faster
  of the two in this run is "best recipe" (its kind is printed next to it);
- open signature (tensorflow, tf_keras): the same plain recipe with an input_signature whose
  batch axis is open ([None, 784]), traced once for every batch size; kept as a reference;
- loop (every flavour): a Python loop over the examples calling bench_gradients.py's compiled
  single-batch gradient (tf.function / jax.jit / torch autograd) on each, then `np.stack`;
- batch gradient (for the norms): that same compiled gradient on the whole batch.

Times are medians of `--repeats` rounds in random order after a warm-up (the norms and the
batch gradient: 5 x `--repeats` rounds of their own); every ratio is the median over rounds
of the two times measured in the same round (robust to load that changes between rounds).
"write floor" is the time of one write of the B x P float32 result into new memory by one
thread per core, which no per-example method returning a new result can beat (out= writes
into memory already mapped, so it may go below it). Peak memory is the rise of the process's
resident set (VmHWM, reset through /proc/self/clear_refs) during one warm call, result
included; its floor is the same np.ones.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from concurrent.futures import ThreadPoolExecutor

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
)


def main(argv: list[str]) -> int:
    args = benchmark_parser(__doc__, batch=64, repeats=10).parse_args(argv)
    if args.worker:
        emit(worker(args.worker, args.batch, args.repeats))
        return 0
    time_rows, memory_rows = [], []
    results, failed = run_flavours(__file__, args, ("batch", "repeats"))
    for flavour, r in results:
        time_rows.append(_time_row(flavour, r))
        memory_rows.append(_memory_row(flavour, r))
        print(f"{flavour}: max relative difference to the loop {r['max_rel_diff']:.1e}, "
              f"norms vs materialized {r['norm_rel_diff']:.1e}{_recipes(r)}", file=sys.stderr)
    print(f"MLP 784-512-512-10, batch {args.batch}; medians of {args.repeats} rounds in random "
          "order (ms)\n")
    print(markdown_table(
        ["flavour", "per-example", "out=", "write floor", "best recipe", "open signature",
         "loop", "norms", "batch grad"], [row[0] for row in time_rows]))
    print("\nRatios (median over rounds of the ratio within a round); best recipe: "
          "static-shape tf.vectorized_map, the faster of plain / XLA\n")
    print(markdown_table(
        ["flavour", "/ best recipe", "/ open signature", "/ loop", "default / floor",
         "out= / floor", "norms / batch grad"], [row[1] for row in time_rows]))
    print("\nPeak resident memory rise during one call (MiB); floor = one write of the "
          "B x P float32 result\n")
    print(markdown_table(
        ["flavour", "floor", "per-example", "/ floor", "out=", "chunk_size=16",
         "result + chunk", "norms", "norms at 4 x B"], memory_rows))
    return 1 if failed else 0


def _time_row(flavour: str, r: dict) -> tuple[list, list]:
    """(the row of times in ms, the row of ratios) of one flavour."""
    tf = "best" in r
    times = [flavour, f"{r['ours_ms']:.1f}", f"{r['out_ms']:.1f}", f"{r['floor_ms']:.1f}",
             f"{r['best_ms']:.1f} ({r['best']})" if tf else "-",
             f"{r['open_ms']:.1f}" if tf else "-", f"{r['loop_ms']:.1f}",
             f"{r['norms_ms']:.1f}", f"{r['batch_ms']:.1f}"]
    q = r["ratios"]
    ratios = [flavour, f"{q['ours/best']:.2f}" if tf else "-",
              f"{q['ours/open']:.2f}" if tf else "-", f"{q['ours/loop']:.2f}",
              f"{q['ours/floor']:.2f}", f"{q['out/floor']:.2f}", f"{q['norms/batch']:.2f}"]
    return times, ratios


def _recipes(r: dict) -> str:
    """The TensorFlow recipes' times and trace counts, for the log ("" on other flavours)."""
    if "best" not in r:
        return ""
    xla = (f"failed ({r['xla_error']})" if "xla_error" in r
           else f"{r['xla_ms']:.1f} ms, {r['xla_traces']} trace(s)")
    return (f"; best recipe: {r['best']} (static shape: plain {r['static_ms']:.1f} ms, "
            f"{r['static_traces']} trace(s); XLA {xla}; open signature {r['open_ms']:.1f} ms, "
            f"{r['open_traces']} trace(s))")


def _memory_row(flavour: str, r: dict) -> list:
    return [flavour, f"{r['floor_mib']:.0f}", f"{r['ours_mib']:.0f}",
            f"{r['ours_mib'] / r['floor_mib']:.2f}", f"{r['out_mib']:.0f}",
            f"{r['chunked_mib']:.0f}",
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

    buffers = gradkit.per_example_gradients(model, x, y)  # an earlier result, reused

    def ours_out():
        return list(gradkit.per_example_gradients(model, x, y, out=buffers).values())

    def loop():
        rows = [single(x[i:i + 1], y[i:i + 1]) for i in range(batch)]
        return [np.stack([row[j] for row in rows]) for j in range(len(rows[0]))]

    size = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    fns = {"ours": ours, "out": ours_out, "loop": loop,
           "floor": parallel_write(np, batch, size),
           "norms": lambda: gradkit.per_example_norms(model, x, y),
           "batch": lambda: single(x, y)}
    result = {}
    if flavour in ("tensorflow", "tf_keras"):
        fns["open"] = vectorized_map_baseline(keras, model, x, y, signature=True)
        fns["static"] = vectorized_map_baseline(keras, model, x, y)
        try:
            fns["xla"] = vectorized_map_baseline(keras, model, x, y, jit_compile=True)
            fns["xla"]()
        except Exception as error:  # noqa: BLE001 - reported; the plain recipe remains
            fns.pop("xla")
            result["xla_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    result.update(_accuracy(fns, np))
    small = ("norms", "batch")  # timed apart: a 164 MiB write between them would dominate
    rounds: dict[str, list[float]] = {}
    for group, count in (([k for k in fns if k not in small], repeats), (small, 5 * repeats)):
        rounds.update(samples({k: fns[k] for k in group}, count, warmup=2))
    result.update({f"{k}_ms": median(v) * 1e3 for k, v in rounds.items()})
    ratios = {"ours/loop": ("ours", "loop"), "ours/floor": ("ours", "floor"),
              "out/floor": ("out", "floor"), "norms/batch": ("norms", "batch")}
    if "static" in fns:
        best = min((k for k in ("static", "xla") if k in fns),
                   key=lambda k: median(rounds[k]))
        result.update(best={"static": "plain", "xla": "XLA"}[best],
                      best_ms=median(rounds[best]) * 1e3)
        ratios.update({"ours/best": ("ours", best), "ours/open": ("ours", "open")})
        for name in ("open", "static", "xla"):
            if name in fns:  # traced once: the static recipes at the batch's shape only
                result[f"{name}_traces"] = fns[name].traces()
    result["ratios"] = {name: paired_ratio(rounds[a], rounds[b])
                        for name, (a, b) in ratios.items()}
    result.update(_memory(gradkit, model, x, y, x4, y4, np, buffers))
    return result


def _accuracy(fns: dict, np) -> dict:
    ours, loop = fns["ours"](), fns["loop"]()
    diff = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
               for a, b in zip(ours, loop))
    materialized = np.sqrt(sum((g.reshape(len(g), -1).astype("float64") ** 2).sum(1)
                               for g in ours))
    norm_diff = float(np.max(np.abs(fns["norms"]() - materialized) / materialized))
    for name in ("out", "open", "static", "xla"):
        if name in fns:
            diff = max(diff, max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
                                 for a, b in zip(fns[name](), loop)))
    return {"max_rel_diff": diff, "norm_rel_diff": norm_diff}


def _memory(gradkit, model, x, y, x4, y4, np, buffers) -> dict:
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
        "out_mib": peak_rise(
            lambda: gradkit.per_example_gradients(model, x, y, out=buffers)) / mib,
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


def vectorized_map_baseline(keras, model, x, y, signature=False, jit_compile=False):
    """The plain TensorFlow recipe: tf.vectorized_map over a per-example tape in a tf.function,
    every gradient to NumPy. `signature`: traced once for any batch size ([None, 784]), else
    traced at the batch's own static shape (the best plain recipe); `jit_compile`: XLA.
    The returned function has ``traces()``: how many times the tf.function was traced."""
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    variables = model.trainable_variables
    options = {"jit_compile": True} if jit_compile else {}
    if signature:
        options["input_signature"] = [tf.TensorSpec([None, 784], tf.float32),
                                      tf.TensorSpec([None], tf.int32)]

    @tf.function(**options)
    def step(xb, yb):
        def one(example):
            xi, yi = example
            with tf.GradientTape() as tape:
                loss = loss_fn(yi[None], model(xi[None], training=False))
            return tape.gradient(loss, variables)

        return tf.vectorized_map(one, (xb, yb))

    def run():
        return [g.numpy() for g in step(x, y)]

    run.traces = step.experimental_get_tracing_count
    return run


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
