"""Spectral estimates of the dataset Hessian: extreme eigenvalues (Lanczos) and the trace.

Both run on `DatasetHessian` (`_dataset_hessian.py`): H (or G) over every example of a
dataset, touched only through products ``H v``, one pass over the data each. The SciPy side
(Lanczos, sketches) sees vectors as flat float64 arrays of length P, the selected variables'
sizes in variable order; the products themselves are float32 (float64 for float64
variables) and summed over batches in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from gradkit._dataset_hessian import DatasetHessian, OutOfBudget
from gradkit._errors import (
    InvalidArgumentError,
    NotConvergedError,
    check_count,
    received,
)

WHICH = {"largest": "LA", "smallest": "SA", "magnitude": "LM"}
TRACE_METHODS = ("hutch++", "hutchinson")


@dataclass(frozen=True, repr=False)
class HessianEigen:
    """Eigenpairs of the dataset Hessian: ``values`` (k,), ``vectors`` (k unit-norm gradient
    sets), ``residuals`` (k,) = ‖H v − λ v‖, ``hvps``: products used, residuals included."""

    values: np.ndarray
    vectors: list
    residuals: np.ndarray
    hvps: int

    def __repr__(self) -> str:
        values = np.array2string(self.values, precision=6, separator=", ")
        return (f"HessianEigen(values={values}, max_residual="
                f"{float(np.max(self.residuals)):.2e}, hvps={self.hvps})")


def hessian_eigenvalues(model: Any, data: Any, *, k: int = 1, which: str = "largest",
                        tol: float = 1e-4, max_hvps: int | None = None, loss: Any = None,
                        target: Any = None, layers: Any = None, training: bool = False,
                        matrix: str = "hessian", batch_size: int | None = None,
                        seed: int = 0, strategy: Any = None) -> HessianEigen:
    """The `k` extreme eigenvalues of the Hessian of the mean loss over `data`, by Lanczos.

    H is the Hessian ``hvp_over()`` multiplies by (mean loss over every example, compiled
    loss or ``loss=``, regularizers included, or the SUM of a ``target=`` score; ``layers=``
    gives a diagonal block; ``training`` as in ``hvp()``: with dropout, Keras 3 draws the
    same masks for a batch in every product, tf-keras new ones, which Lanczos cannot use).
    ``matrix="ggn"``: the generalized Gauss-Newton matrix of ``ggn_vp_over()`` instead
    (positive semi-definite for a convex loss; no regularizers, no target=). `data`: a tuple
    ``(x, y)`` or any source ``accumulate()`` takes; its batches are
    read once and kept in memory, since every product is a pass over them. ``which``:
    ``"largest"`` (algebraic, largest first), ``"smallest"`` (algebraic, smallest first:
    negative curvature) or ``"magnitude"`` (largest |λ| first). SciPy's ``eigsh`` (ARPACK)
    runs on the products, to relative accuracy ``tol``, from a start vector drawn with
    ``seed`` (with ``training=True`` it also draws the dropout masks, the same for every
    product: one fixed matrix). ``max_hvps``: the most products it may use (None: ARPACK's
    own limit);
    past it, NotConvergedError. Returns a `HessianEigen`; no model state changes.
    ``strategy=``: torch.distributed, as in ``hvp_over()``; every process runs the same
    Lanczos iteration on the same all-reduced products, so all get the same result.
    """
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    _check_eigen_options(k, which, tol, max_hvps)
    hessian = DatasetHessian(model, data, needed_by="hessian_eigenvalues()", keep=True,
                             strategy=strategy, seed=seed, matrix=matrix, loss=loss,
                             target=target, layers=layers, training=training,
                             batch_size=batch_size)
    if k >= hessian.size:
        raise InvalidArgumentError(
            f"k= must be below the number of selected weights ({hessian.size}); Lanczos finds "
            "a few eigenvalues, not all. For all of them build H with hvp() on basis vectors. "
            + received(k=k, weights=hessian.size))
    operator = LinearOperator((hessian.size,) * 2, matvec=hessian.matvec, dtype=np.float64)
    hessian.budget = max_hvps
    start = np.random.default_rng(seed).standard_normal(hessian.size)
    try:
        values, vectors = eigsh(operator, k=k, which=WHICH[which], tol=tol, v0=start)
    except (OutOfBudget, ArpackNoConvergence):
        raise NotConvergedError(
            f"The Lanczos eigensolver did not find {k} eigenvalue(s) ({which}) to tol={tol} "
            f"within {hessian.products} Hessian-vector products. Allow more with max_hvps=, "
            "loosen tol=, ask for fewer (k=), or use which='magnitude' (converges fastest). "
            + received(max_hvps=max_hvps, hvps=hessian.products)) from None
    hessian.budget = None
    order = {"largest": -values, "smallest": values, "magnitude": -np.abs(values)}[which]
    values, vectors = values[np.argsort(order)], vectors[:, np.argsort(order)].T
    vectors = [v * np.sign(v[np.argmax(np.abs(v))]) / np.linalg.norm(v) for v in vectors]
    residuals = [np.linalg.norm(hessian.matvec(v) - lam * v) for lam, v in zip(values, vectors)]
    return HessianEigen(values, [hessian.named(v) for v in vectors], np.array(residuals),
                        hessian.products)


def _check_eigen_options(k: Any, which: Any, tol: Any, max_hvps: Any) -> None:
    check_count("k", k, 1)
    if which not in WHICH:
        raise InvalidArgumentError(
            f"which= must be one of {tuple(WHICH)}. " + received(which=which))
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise InvalidArgumentError(
            "tol= must be a number in (0, 1): the relative accuracy of the eigenvalues. "
            + received(tol=tol))
    if max_hvps is not None:
        check_count("max_hvps", max_hvps, 1)


class TraceEstimate(NamedTuple):
    """An unbiased estimate of tr(H) and its standard error."""

    estimate: float
    standard_error: float


def hessian_trace(model: Any, data: Any, *, samples: int = 100, method: str = "hutch++",
                  seed: int | None = None, loss: Any = None, target: Any = None,
                  layers: Any = None, training: bool = False, matrix: str = "hessian",
                  batch_size: int | None = None, strategy: Any = None) -> TraceEstimate:
    """A randomized, unbiased estimate of the trace of the dataset Hessian, from `samples`
    Hessian-vector products over `data` (H, ``matrix=``, `data` and what ``seed`` draws as in
    ``hessian_eigenvalues()``).

    ``method="hutchinson"``: the mean of zᵀHz over Rademacher probes z; standard error
    std / √samples. ``"hutch++"`` (Meyer, Musco, Musco and Woodruff, 2021): a third of the
    products sketch the range of H (Q = orth(H S)), tr(QᵀHQ) is taken exactly, and
    Hutchinson probes of (I − QQᵀ) H (I − QQᵀ) estimate the rest, so the error shrinks
    like 1/samples instead of 1/√samples when a few eigenvalues dominate; its standard
    error is that of the Hutchinson part, given the sketch (0 when Q spans every weight).
    Returns ``TraceEstimate(estimate, standard_error)``; no model state changes.
    ``strategy=``: torch.distributed, as in ``hvp_over()``; the probes are drawn from the
    same seed on every process (``seed=None``: one drawn at random and shared), so every
    process gets the same estimate.
    """
    if method not in TRACE_METHODS:
        raise InvalidArgumentError(
            f"method= must be one of {TRACE_METHODS}. " + received(method=method))
    check_count("samples", samples, 2 if method == "hutchinson" else 6)
    hessian = DatasetHessian(model, data, needed_by="hessian_trace()", keep=True,
                             strategy=strategy, seed=seed, matrix=matrix, loss=loss,
                             target=target, layers=layers, training=training,
                             batch_size=batch_size)
    shared = seed is None and hessian.group is not None
    rng = np.random.default_rng(hessian.group.shared_seed if shared else seed)

    def rademacher(count: int) -> np.ndarray:
        return rng.choice([-1.0, 1.0], size=(count, hessian.size))

    if method == "hutchinson":
        return _hutchinson(hessian.matvec, rademacher(samples), 0.0)
    sketch = samples // 3
    image = np.stack([hessian.matvec(s) for s in rademacher(sketch)], axis=1)
    basis = np.linalg.qr(image)[0]  # P x min(P, sketch), orthonormal columns
    exact = sum(float(q @ hessian.matvec(q)) for q in basis.T)
    if basis.shape[1] == hessian.size:  # the sketch spans every weight: no remainder
        return TraceEstimate(exact, 0.0)
    probes = rademacher(samples - sketch - basis.shape[1])
    return _hutchinson(hessian.matvec, probes - (probes @ basis) @ basis.T, exact)


def _hutchinson(matvec, probes: np.ndarray, offset: float) -> TraceEstimate:
    values = np.array([float(z @ matvec(z)) for z in probes])
    error = float(np.std(values, ddof=1) / np.sqrt(len(values)))
    return TraceEstimate(offset + float(np.mean(values)), error)
