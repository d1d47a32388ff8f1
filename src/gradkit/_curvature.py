"""Curvature of the dataset objective: Hessian-vector products, extreme eigenvalues, trace.

The Hessian over every example of a dataset is, as `accumulate()` weights gradients,

    H = Σ_b (n_b / N) H_b      (a mean-reduced loss),      H = Σ_b H_b      (target=),

and every function here touches it only through products ``H v``: one pass over the data
each, batch by batch through the adapter operation of `hvp()` (exact, compiled, cached).
The SciPy side (Lanczos, sketches) sees vectors as flat float64 arrays of length P, the
selected variables' sizes in variable order; the products themselves are float32 (float64
for float64 variables) and summed over batches in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from gradkit._accumulate import prepare_dataset
from gradkit._distributed import process_group
from gradkit._errors import (
    InvalidArgumentError,
    NonFiniteGradientError,
    NotConvergedError,
    original_errors,
    received,
)
from gradkit._ggn import check_loss_on_outputs
from gradkit._hvp import check_exact_second_order, checked_vector
from gradkit._objective import check_mean_reduction
from gradkit._request import check_connected, finish, result_dtype

WHICH = {"largest": "LA", "smallest": "SA", "magnitude": "LM"}
TRACE_METHODS = ("hutch++", "hutchinson")
MATRICES = ("hessian", "ggn")


class DatasetHessian:
    """H (or G) of the dataset objective as products: `product()` per variable, `matvec()`
    flat. `matrix`: "hessian" (`hvp()`'s products) or "ggn" (`ggn_vp()`'s)."""

    def __init__(self, model: Any, data: Any, *, needed_by: str, keep: bool,
                 strategy: Any = None, vector: Any = None, seed: Any = None,
                 matrix: str = "hessian", **options: Any):
        if matrix not in MATRICES:
            raise InvalidArgumentError(
                f"matrix= must be one of {MATRICES}: the Hessian, or the generalized "
                "Gauss-Newton matrix of the loss on the outputs. " + received(matrix=matrix))
        self.group = process_group(model, strategy, needed_by, others=False)
        self.operation = matrix

        def prepared():
            request, stream = prepare_dataset(model, data, **options)
            check_mean_reduction(model, request.objective, needed_by)
            if matrix == "ggn":
                check_loss_on_outputs(request)
            else:
                check_exact_second_order(request)
            tangents = None if vector is None else checked_vector(request, vector)
            # A pass per product: keep the checked batches when there are many passes (a
            # generator can be read once); read the stream as it comes for a single one.
            return request, stream, [b for _, b in stream] if keep else None, tangents

        if self.group is None:
            parts = prepared()
        else:  # the same model, options, vector and seed on every process, or raise
            parts = self.group.agree(prepared, lambda p: self.group.signature(
                p[0].variables, vector=p[3], seed=-1 if seed is None else seed))
        self.request, self._stream, self._batches, self.tangents = parts
        self.shapes = [tuple(v.shape) for v in self.request.variables]
        self.dtypes = [result_dtype(v) for v in self.request.variables]
        self.sizes = [int(np.prod(shape)) for shape in self.shapes]
        self.size = sum(self.sizes)
        self.budget: int | None = None
        self.products = 0

    def product(self, tangents: list[np.ndarray]) -> list[np.ndarray]:
        """Σ_b w_b H_b v (or G_b v) per variable (float64), w_b = n_b / N, or 1 for target=; over
        every process's batches under torch.distributed (a collective call)."""
        if self.budget is not None and self.products >= self.budget:
            raise _OutOfBudget
        if self.group is None:
            total, count = self._local_product(tangents)
        else:
            total, count = self.group.total(lambda: self._local_product(tangents),
                                            self.request.variables)
        self.products += 1
        weighted = self.request.objective.kind != "target"
        return [sum_ / count for sum_ in total] if weighted else total

    def _local_product(self, tangents: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
        """(Σ_b w_b H_b v over this process's batches, in float64, its example count)."""
        batches = self._batches if self._batches is not None else (b for _, b in self._stream)
        weighted = self.request.objective.kind != "target"
        total = [np.zeros(shape, np.float64) for shape in self.shapes]
        count = 0
        with original_errors():
            for index, batch in enumerate(batches):
                adapter, one = self.request.adapter, self.request.replace(batch=batch)
                _, parts = adapter.hvp(one, tangents) if self.operation == "hessian" \
                    else adapter.ggn_vp(one, tangents)
                if index == 0:
                    check_connected(self.request.keys, [p is not None for p in parts],
                                    what=self.operation + " product")
                weight = float(batch.size) if weighted else 1.0
                for sum_, part in zip(total, parts):
                    sum_ += weight * np.asarray(part, np.float64).reshape(sum_.shape)
                count += batch.size
        return total, count

    def matvec(self, flat: np.ndarray) -> np.ndarray:
        """H v for a flat float64 v (SciPy's LinearOperator contract)."""
        result = self.flat(self.product(self.unflat(flat)))
        if not np.all(np.isfinite(result)):
            raise NonFiniteGradientError(
                "A Hessian-vector product over the data holds NaN or Inf, so no curvature "
                "can be estimated. Check the data and the loss (log(0), division by zero) "
                "with gradkit.accumulate(). " + received(products=self.products)
            )
        return result.reshape(np.shape(flat))

    def unflat(self, flat: np.ndarray) -> list[np.ndarray]:
        pieces = np.split(np.ravel(flat), np.cumsum(self.sizes)[:-1])
        return [p.reshape(s).astype(d) for p, s, d in zip(pieces, self.shapes, self.dtypes)]

    def flat(self, arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([np.ravel(a) for a in arrays]).astype(np.float64)

    def named(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.request.keys, self.unflat(flat)))


class _OutOfBudget(Exception):
    """Raised inside eigsh's matvec once max_hvps products are used."""


def hvp_over(model: Any, data: Any, *, vector: dict, loss: Any = None, target: Any = None,
             layers: Any = None, training: bool = False, batch_size: int | None = None,
             strategy: Any = None) -> dict[str, np.ndarray]:
    """``H v`` for the Hessian of the objective over every example of `data`.

    With a loss, H is the Hessian of the MEAN loss over all N examples (what ``hvp()`` would
    return on the whole dataset as one batch): batch b's product weighted by n_b / N; the
    loss must be mean-reduced, as in ``accumulate()``. With ``target=`` it is the SUM over
    every example. `data`: any source ``accumulate()`` takes (a tuple of arrays is cut into
    batches of ``batch_size``). ``vector``, ``layers``, ``training``, keys, order and dtypes
    as in ``hvp()``; one pass over the data; no model state changes. ``strategy=``:
    ``"torch.distributed"`` or a process group (torch only): a COLLECTIVE call, each process
    passing its own share of the data and the same ``vector``, all getting H v over the
    union (see ``accumulate()``).
    """
    hessian = DatasetHessian(model, data, needed_by="hvp_over()", keep=False,
                             strategy=strategy, vector=vector, loss=loss, target=target,
                             layers=layers, training=training, batch_size=batch_size)
    return finish(hessian.request, hessian.product(hessian.tangents))


def ggn_vp_over(model: Any, data: Any, *, vector: dict, loss: Any = None, layers: Any = None,
                training: bool = False, batch_size: int | None = None) -> dict[str, np.ndarray]:
    """``G v`` for the generalized Gauss-Newton matrix of the MEAN loss over every example of
    `data` (G as in ``ggn_vp()``, batch b's product weighted by n_b / N; the loss must be
    mean-reduced). Options, keys, order and dtypes as ``hvp_over()``; one pass over the
    data; no model state changes."""
    ggn = DatasetHessian(model, data, needed_by="ggn_vp_over()", keep=False, matrix="ggn",
                         loss=loss, layers=layers, training=training, batch_size=batch_size)
    return finish(ggn.request, ggn.product(checked_vector(ggn.request, vector)))


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
    ``seed``. ``max_hvps``: the most products it may use (None: ARPACK's own limit);
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
    except (_OutOfBudget, ArpackNoConvergence):
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
    Hessian-vector products over `data` (H, ``matrix=`` and `data` as in
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


def check_count(name: str, value: Any, least: int) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < least:
        raise InvalidArgumentError(
            f"{name}= must be an int of at least {least}. " + received(**{name: value}))
