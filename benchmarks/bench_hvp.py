"""Steady-state time of `gradkit.hvp` against `gradkit.gradients` on the same model and batch.

    python benchmarks/bench_hvp.py [--flavours tensorflow,jax,torch,tf_keras]
                                   [--repeats 100] [--batch 256] [--threads N]

Model: the 784-512-512-10 MLP of bench_gradients.py (relu, softmax, sparse categorical
cross-entropy), one batch of `--batch` examples. Each flavour runs in its own process.
`gk.hvp(model, x, y, vector=g)` with `g = gk.gradients(model, x, y)` and
`gk.gradients(model, x, y)` run alternately (warm-up first, so compilation is excluded, then
`--repeats` rounds in random order); the table gives the median times, and the ratio is
the median over rounds of hvp/gradients timed in the same round (robust to load that
changes between rounds). A Hessian-vector product costs about one forward and two backward
passes more than a gradient; the target is a ratio of at most 2.5. The first call of each
(tracing / compilation included) is reported on stderr.
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
    threads_label,
    timed,
)
from bench_gradients import build_model  # noqa: E402

TARGET = 2.5


def main(argv: list[str]) -> int:
    args = benchmark_parser(__doc__, repeats=100, batch=256, threads=0).parse_args(argv)
    if args.worker:
        emit(worker(args.worker, args.batch, args.repeats, args.threads))
        return 0
    rows = []
    results, failed = run_flavours(__file__, args, ("batch", "repeats", "threads"))
    for flavour, r in results:
        rows.append([flavour, f"{r['gradients_ms']:.2f}", f"{r['hvp_ms']:.2f}",
                     f"{r['ratio']:.2f}", "yes" if r["ratio"] <= TARGET else "NO"])
        print(f"{flavour}: first call (compilation included): gradients "
              f"{r['first_gradients_ms']:.0f} ms, hvp {r['first_hvp_ms']:.0f} ms",
              file=sys.stderr)
    threads = threads_label(args.threads)
    print(f"MLP 784-512-512-10, batch {args.batch}, median of {args.repeats} interleaved "
          f"rounds, {threads}; ratio = hvp / gradients, paired by round\n")
    print(markdown_table(
        ["flavour", "gradients ms", "hvp ms", "ratio", f"ratio <= {TARGET}"], rows))
    return 1 if failed else 0


def worker(flavour: str, batch: int, repeats: int, threads: int) -> dict:
    keras = setup_flavour(flavour, threads)
    import numpy as np

    import gradkit as gk

    keras.utils.set_random_seed(0)
    model = build_model(keras)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 784)).astype("float32")
    y = rng.integers(0, 10, size=batch).astype("int32")

    first_gradients = timed(lambda: gk.gradients(model, x, y))
    vector = gk.gradients(model, x, y)
    first_hvp = timed(lambda: gk.hvp(model, x, y, vector=vector))
    product = gk.hvp(model, x, y, vector=vector)
    if list(product) != list(vector) or not all(np.all(np.isfinite(p))
                                                for p in product.values()):
        raise SystemExit("hvp returned other keys or non-finite values")

    times = samples({"gradients": lambda: gk.gradients(model, x, y),
                     "hvp": lambda: gk.hvp(model, x, y, vector=vector)}, repeats)
    return {"gradients_ms": median(times["gradients"]) * 1e3,
            "hvp_ms": median(times["hvp"]) * 1e3,
            "ratio": paired_ratio(times["hvp"], times["gradients"]),
            "first_gradients_ms": first_gradients * 1e3, "first_hvp_ms": first_hvp * 1e3}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
