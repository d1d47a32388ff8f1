"""`fit` with a `transforms.wrap`-ped optimizer against `fit` with the optimizer's own clipping.

    python benchmarks/bench_wrap.py [--flavours tensorflow,jax,torch,tf_keras]
                                    [--examples 60000] [--batch 256] [--repeats 3]

Model: the 784-512-512-10 MLP of bench_gradients.py, SGD(0.01); one epoch of `fit` over
`--examples` generated examples at batch `--batch`. Two models with the same weights:

- wrapped: ``SGD`` wrapped with ``transforms.clip_by_global_norm(1.0)`` (the transform runs in
  the compiled train step);
- baseline: ``SGD(global_clipnorm=1.0)``, Keras' own clipping, the same arithmetic.

After a warm-up round (compilation excluded), each of `--repeats` rounds times four epochs in
the balanced order wrapped, baseline, baseline, wrapped, so that neither model always runs
first or right after the other (a fixed order biased a 3-round median). Per round the ratio is
(wrapped epochs) / (baseline epochs), in wall time and in the process's CPU time (all threads:
less sensitive to other processes on a shared machine); the table gives the medians over
rounds and the range of the wall ratio. Target: wall ratio <= 1.05. Both models must also end
at the same weights (up to float rounding), which is checked.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    FLAVOURS,
    emit,
    markdown_table,
    median,
    paired_ratio,
    run_worker,
    setup_flavour,
)
from bench_gradients import build_model  # noqa: E402

TARGET = 1.05


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
    rows, failed, load = [], False, os.getloadavg()[0]
    for flavour in [f for f in args.flavours.split(",") if f]:
        r = run_worker(os.path.abspath(__file__), flavour, options)
        if "error" in r:
            print(f"{flavour}: FAILED {r['error']}", file=sys.stderr)
            failed = True
            continue
        rows.append([flavour, f"{r['baseline_s']:.2f}", f"{r['wrapped_s']:.2f}",
                     f"{r['ratio']:.3f}", f"{r['low']:.2f}-{r['high']:.2f}",
                     f"{r['cpu_ratio']:.3f}", "yes" if r["ratio"] <= TARGET else "NO",
                     f"{r['max_diff']:.1e}"])
    print(f"One epoch of fit, MLP 784-512-512-10, {args.examples} examples, batch "
          f"{args.batch}; medians of {args.repeats} rounds (s); load average "
          f"{load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end\n")
    print(markdown_table(["flavour", "global_clipnorm", "wrap(clip_by_global_norm)", "ratio",
                          "range", "CPU-time ratio", f"<= {TARGET}", "weights differ by"],
                         rows))
    return 1 if failed else 0


def worker(flavour: str, examples: int, batch: int, repeats: int) -> dict:
    keras = setup_flavour(flavour)
    import numpy as np

    from gradkit import transforms as T

    rng = np.random.default_rng(0)
    x = rng.normal(size=(examples, 784)).astype("float32")
    y = rng.integers(0, 10, size=examples).astype("int32")
    keras.utils.set_random_seed(0)
    wrapped, baseline = build_model(keras), build_model(keras)
    baseline.set_weights(wrapped.get_weights())
    loss = keras.losses.SparseCategoricalCrossentropy()
    wrapped.compile(optimizer=T.wrap(keras.optimizers.SGD(0.01), T.clip_by_global_norm(1.0)),
                    loss=loss)
    baseline.compile(optimizer=keras.optimizers.SGD(0.01, global_clipnorm=1.0), loss=loss)

    def epoch(model):
        return lambda: model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)

    wall, cpu = balanced_rounds({"wrapped": epoch(wrapped), "baseline": epoch(baseline)},
                                repeats)
    ratios = [a / b for a, b in zip(wall["wrapped"], wall["baseline"])]
    diff = max(float(np.max(np.abs(a - b)))
               for a, b in zip(wrapped.get_weights(), baseline.get_weights()))
    return {"wrapped_s": median(wall["wrapped"]), "baseline_s": median(wall["baseline"]),
            "ratio": median(ratios), "low": min(ratios), "high": max(ratios),
            "cpu_ratio": paired_ratio(cpu["wrapped"], cpu["baseline"]), "max_diff": diff}


def balanced_rounds(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Per round, the mean wall and process-CPU seconds of each of two functions, called in
    the order a, b, b, a (one such round first as a warm-up, not recorded)."""
    a, b = fns
    wall: dict = {a: [], b: []}
    cpu: dict = {a: [], b: []}
    for round_ in range(repeats + 1):
        spent = {a: [0.0, 0.0], b: [0.0, 0.0]}
        for name in (a, b, b, a):
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            spent[name][0] += (time.perf_counter() - start) / 2
            spent[name][1] += (time.process_time() - start_cpu) / 2
        if round_:
            for name in (a, b):
                wall[name].append(spent[name][0])
                cpu[name].append(spent[name][1])
    return wall, cpu


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
