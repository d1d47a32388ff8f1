"""Curvature costs: `ggn_vp` and `hvp` against `gradients`, and the top Hessian eigenvalue.

    python benchmarks/bench_curvature.py [--flavours tensorflow,jax,torch,tf_keras]
                                         [--repeats 30] [--batch 256] [--threads N]

Model: the 784-512-512-10 MLP of bench_gradients.py (relu, softmax, sparse categorical
cross-entropy), one batch of `--batch` examples; each flavour in its own process.

1. `gk.ggn_vp` and `gk.hvp` (vector = the gradient) against `gk.gradients`, timed in turn
   (warm-up first, so compilation is excluded; `--repeats` rounds in random order); ratios
   are medians over rounds of the ratio within a round.
2. `gk.hessian_eigenvalues(model, (x, y), k=1, tol=1e-3)` on that batch: its products and
   wall time, and the relative error of its eigenvalue against a reference run at
   tol=1e-8 (whose products are reported too). The same for ``matrix="ggn"``. ARPACK
   checks convergence only after a full cycle of ncv = 20 Lanczos steps, so the products
   it takes come in that unit; for the products Lanczos itself needs, a plain Lanczos loop
   (full reorthogonalization, from a seeded normal vector) over `gk.hvp` (`gk.ggn_vp`)
   reports the first step whose top Ritz value is within 1e-3 of the reference.
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

TOL, REFERENCE_TOL = 1e-3, 1e-8


def main(argv: list[str]) -> int:
    args = benchmark_parser(__doc__, repeats=30, batch=256, threads=0).parse_args(argv)
    if args.worker:
        emit(worker(args.worker, args.batch, args.repeats, args.threads))
        return 0
    products, eigen = [], []
    results, failed = run_flavours(__file__, args, ("batch", "repeats", "threads"))
    for flavour, r in results:
        products.append([flavour, f"{r['gradients_ms']:.2f}", f"{r['ggn_ms']:.2f}",
                         f"{r['hvp_ms']:.2f}", f"{r['ggn_ratio']:.2f}",
                         f"{r['hvp_ratio']:.2f}"])
        for matrix in ("hessian", "ggn"):
            e = r[matrix]
            eigen.append([flavour, matrix, f"{e['value']:.6g}", str(e["hvps"]),
                          f"{e['seconds']:.2f}", f"{e['error']:.1e}",
                          str(e["reference_hvps"]), str(e["lanczos_steps"])])
    threads = threads_label(args.threads)
    print(f"MLP 784-512-512-10, batch {args.batch}, {threads}; median of {args.repeats} "
          "interleaved rounds, ratios paired by round\n")
    print(markdown_table(["flavour", "gradients ms", "ggn_vp ms", "hvp ms",
                          "ggn_vp / gradients", "hvp / gradients"], products))
    print(f"\nhessian_eigenvalues(k=1, tol={TOL:g}) on the same batch; error relative to a "
          f"tol={REFERENCE_TOL:g} run\n")
    print(markdown_table(["flavour", "matrix", "top eigenvalue", "products", "seconds",
                          "relative error", f"products at tol={REFERENCE_TOL:g}",
                          "Lanczos steps to 1e-3"], eigen))
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
    vector = gk.gradients(model, x, y)
    calls = {"gradients": lambda: gk.gradients(model, x, y),
             "ggn": lambda: gk.ggn_vp(model, x, y, vector=vector),
             "hvp": lambda: gk.hvp(model, x, y, vector=vector)}
    times = samples(calls, repeats)
    result = {f"{name}_ms": median(values) * 1e3 for name, values in times.items()}
    result.update(ggn_ratio=paired_ratio(times["ggn"], times["gradients"]),
                  hvp_ratio=paired_ratio(times["hvp"], times["gradients"]))
    for matrix in ("hessian", "ggn"):
        reference = gk.hessian_eigenvalues(model, (x, y), k=1, tol=REFERENCE_TOL,
                                           matrix=matrix, batch_size=batch)
        found = []
        seconds = timed(lambda: found.append(gk.hessian_eigenvalues(
            model, (x, y), k=1, tol=TOL, matrix=matrix, batch_size=batch)))
        value, truth = float(found[0].values[0]), float(reference.values[0])
        product = {"hessian": gk.hvp, "ggn": gk.ggn_vp}[matrix]
        result[matrix] = {"value": value, "hvps": found[0].hvps, "seconds": seconds,
                          "error": abs(value - truth) / abs(truth),
                          "reference_hvps": reference.hvps,
                          "lanczos_steps": lanczos_steps(
                              lambda v: product(model, x, y, vector=v), vector, truth)}
    return result


def lanczos_steps(product, template: dict, truth: float, most: int = 60) -> int:
    """The first Lanczos step whose largest Ritz value is within TOL of `truth`."""
    import numpy as np

    sizes = [g.size for g in template.values()]

    def matvec(flat):
        pieces = np.split(flat, np.cumsum(sizes)[:-1])
        vector = {k: p.reshape(g.shape).astype(g.dtype)
                  for (k, g), p in zip(template.items(), pieces)}
        return np.concatenate([np.ravel(h) for h in product(vector).values()]).astype(float)

    start = np.random.default_rng(0).standard_normal(sum(sizes))
    basis, alphas, betas = [start / np.linalg.norm(start)], [], []
    for step in range(1, most + 1):
        w = matvec(basis[-1])
        alphas.append(float(basis[-1] @ w))
        q = np.array(basis)
        for _ in range(2):
            w = w - q.T @ (q @ w)
        top = np.linalg.eigvalsh(np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))[-1]
        if abs(top - truth) <= TOL * abs(truth):
            return step
        betas.append(float(np.linalg.norm(w)))
        basis.append(w / betas[-1])
    return -1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
