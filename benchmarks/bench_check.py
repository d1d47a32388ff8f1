"""Wall time of `gradkit.check_gradients` on the MLP 784-512-512-10, batch 256, per flavour.

    python benchmarks/bench_check.py [--flavours tensorflow,jax,torch,tf_keras]
                                     [--repeats 3] [--directions 3] [--threads N]

A check clones the model in float64, takes one gradient and about 4 x directions objective
evaluations per variable (6 variables here), plus 7 for the rounding-noise probe; each call
builds a new copy, so compilation is part of its cost. Reported: the median of `--repeats`
calls, the time of one `gradients()` on the original model (steady state) for scale, the
precision the check reached (float64, or the float32 fallback) and whether it passed.
"""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    benchmark_parser,
    emit,
    markdown_table,
    median,
    run_flavours,
    setup_flavour,
    threads_label,
    timed,
)
from bench_gradients import build_model  # noqa: E402


def main(argv: list[str]) -> int:
    args = benchmark_parser(__doc__, repeats=3, directions=3, batch=256,
                            threads=0).parse_args(argv)
    if args.worker:
        emit(worker(args.worker, args.batch, args.repeats, args.directions, args.threads))
        return 0
    rows = []
    results, failed = run_flavours(__file__, args, ("batch", "repeats", "directions", "threads"))
    for flavour, r in results:
        rows.append([flavour, f"{r['check_s']:.2f}", f"{r['gradients_ms']:.1f}",
                     r["precision"], "yes" if r["ok"] else "NO"])
    threads = threads_label(args.threads)
    print(f"MLP 784-512-512-10, batch {args.batch}, {args.directions} directions, median of "
          f"{args.repeats} calls, {threads}\n")
    print(markdown_table(["flavour", "check_gradients s", "gradients ms", "precision", "ok"],
                         rows))
    return 1 if failed else 0


def worker(flavour: str, batch: int, repeats: int, directions: int, threads: int) -> dict:
    keras = setup_flavour(flavour, threads)
    import numpy as np

    import gradkit as gk

    keras.utils.set_random_seed(0)
    model = build_model(keras)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 784)).astype("float32")
    y = rng.integers(0, 10, size=batch).astype("int32")
    gk.gradients(model, x, y)
    gradients = median([timed(lambda: gk.gradients(model, x, y)) for _ in range(10)])
    reports, times = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for seed in range(repeats):
            times.append(timed(lambda: reports.append(
                gk.check_gradients(model, x, y, directions=directions, seed=seed))))
    return {"check_s": median(times), "gradients_ms": gradients * 1e3,
            "precision": reports[-1].precision, "ok": all(r.ok for r in reports)}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
