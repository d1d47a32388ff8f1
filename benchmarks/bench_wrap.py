"""`fit` with a `transforms.wrap`-ped optimizer against `fit` with the optimizer's own clipping.

    python benchmarks/bench_wrap.py [--flavours tensorflow,jax,torch,tf_keras]
                                    [--examples 60000] [--batch 256] [--repeats 3]

Model: the 784-512-512-10 MLP of bench_gradients.py, SGD(0.01); one epoch of `fit` over
`--examples` generated examples at batch `--batch`. Two models with the same weights, timed
alternately, each epoch after a warm-up epoch (compilation excluded):

- wrapped: ``SGD`` wrapped with ``transforms.clip_by_global_norm(1.0)`` (the transform runs in
  the compiled train step);
- baseline: ``SGD(global_clipnorm=1.0)``, Keras' own clipping, the same arithmetic.

Target: wrapped / baseline <= 1.05 (median over rounds of the ratio within a round). Both must
also end at the same weights (up to float rounding), which is checked.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    FLAVOURS,
    emit,
    markdown_table,
    median,
    paired_ratio,
    run_worker,
    samples,
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
    rows, failed = [], False
    for flavour in [f for f in args.flavours.split(",") if f]:
        r = run_worker(os.path.abspath(__file__), flavour, options)
        if "error" in r:
            print(f"{flavour}: FAILED {r['error']}", file=sys.stderr)
            failed = True
            continue
        rows.append([flavour, f"{r['baseline_s']:.2f}", f"{r['wrapped_s']:.2f}",
                     f"{r['ratio']:.3f}", "yes" if r["ratio"] <= TARGET else "NO",
                     f"{r['max_diff']:.1e}"])
    print(f"One epoch of fit, MLP 784-512-512-10, {args.examples} examples, batch "
          f"{args.batch}; medians of {args.repeats} rounds (s)\n")
    print(markdown_table(["flavour", "global_clipnorm", "wrap(clip_by_global_norm)", "ratio",
                          f"<= {TARGET}", "weights differ by"], rows))
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

    times = samples({"wrapped": epoch(wrapped), "baseline": epoch(baseline)}, repeats,
                    warmup=1)
    diff = max(float(np.max(np.abs(a - b)))
               for a, b in zip(wrapped.get_weights(), baseline.get_weights()))
    return {"wrapped_s": median(times["wrapped"]), "baseline_s": median(times["baseline"]),
            "ratio": paired_ratio(times["wrapped"], times["baseline"]), "max_diff": diff}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
