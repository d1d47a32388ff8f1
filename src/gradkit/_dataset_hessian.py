"""The dataset's curvature matrix as an operator: products over every batch of a dataset.

The Hessian over every example of a dataset is, as `accumulate()` weights gradients,

    H = Σ_b (n_b / N) H_b      (a mean-reduced loss),      H = Σ_b H_b      (target=),

(the generalized Gauss-Newton matrix G likewise), touched only through products ``H v``:
one pass over the data each, batch by batch through the adapter operation of `hvp()` or
`ggn_vp()` (exact, compiled, cached), summed in float64. `DatasetHessian` is the operator
the spectral estimates (`_curvature.py`, `_density.py`) run on; `hvp_over()` and
`ggn_vp_over()` are its one-product front doors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradkit._accumulate import prepare_dataset
from gradkit._distributed import process_group
from gradkit._errors import (
    InvalidArgumentError,
    NonFiniteGradientError,
    original_errors,
    received,
)
from gradkit._ggn import check_loss_on_outputs
from gradkit._hvp import check_exact_second_order, checked_vector
from gradkit._objective import check_mean_reduction
from gradkit._request import check_connected, finish, result_dtype
from gradkit._seeds import check_seed, resolve_seed

MATRICES = ("hessian", "ggn")


class DatasetHessian:
    """H (or G) of the dataset objective as products: `product()` per variable, `matvec()`
    flat. `matrix`: "hessian" (`hvp()`'s products) or "ggn" (`ggn_vp()`'s). With
    ``training=True`` every product of one operator uses the same dropout masks (drawn from
    `seed`, or from one fresh seed when it is None): one fixed matrix."""

    def __init__(self, model: Any, data: Any, *, needed_by: str, keep: bool,
                 strategy: Any = None, vector: Any = None, seed: Any = None,
                 matrix: str = "hessian", **options: Any):
        if matrix not in MATRICES:
            raise InvalidArgumentError(
                f"matrix= must be one of {MATRICES}: the Hessian, or the generalized "
                "Gauss-Newton matrix of the loss on the outputs. " + received(matrix=matrix))
        check_seed(seed, "random draws")
        self.group = process_group(model, strategy, needed_by, others=False)
        self.operation = matrix

        def prepared():
            dropout = seed if options.get("training") else None
            request, stream = prepare_dataset(model, data, seed=dropout, **options)
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
            raise OutOfBudget
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
                                    what=self.operation + " product",
                                    layers=self.request.layers)
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


class OutOfBudget(Exception):
    """Raised inside eigsh's matvec once max_hvps products are used."""


def hvp_over(model: Any, data: Any, *, vector: dict, loss: Any = None, target: Any = None,
             layers: Any = None, training: bool = False, seed: int | None = None,
             batch_size: int | None = None, strategy: Any = None) -> dict[str, np.ndarray]:
    """``H v`` for the Hessian of the objective over every example of `data`.

    With a loss, H is the Hessian of the MEAN loss over all N examples (what ``hvp()`` would
    return on the whole dataset as one batch): batch b's product weighted by n_b / N; the
    loss must be mean-reduced, as in ``accumulate()``. With ``target=`` it is the SUM over
    every example. `data`: any source ``accumulate()`` takes (a tuple of arrays is cut into
    batches of ``batch_size``). ``vector``, ``layers``, ``training``, ``seed``, keys, order
    and dtypes as in ``hvp()``; one pass over the data; no model state changes. ``strategy=``:
    ``"torch.distributed"`` or a process group (torch only): a COLLECTIVE call, each process
    passing its own share of the data and the same ``vector``, all getting H v over the
    union (see ``accumulate()``).
    """
    resolve_seed(seed, training)  # seed= without training=True raises, as in hvp()
    hessian = DatasetHessian(model, data, needed_by="hvp_over()", keep=False,
                             strategy=strategy, vector=vector, seed=seed, loss=loss,
                             target=target, layers=layers, training=training,
                             batch_size=batch_size)
    return finish(hessian.request, hessian.product(hessian.tangents))


def ggn_vp_over(model: Any, data: Any, *, vector: dict, loss: Any = None, layers: Any = None,
                training: bool = False, seed: int | None = None,
                batch_size: int | None = None) -> dict[str, np.ndarray]:
    """``G v`` for the generalized Gauss-Newton matrix of the MEAN loss over every example of
    `data` (G as in ``ggn_vp()``, batch b's product weighted by n_b / N; the loss must be
    mean-reduced). Options, keys, order and dtypes as ``hvp_over()``; one pass over the
    data; no model state changes."""
    resolve_seed(seed, training)  # seed= without training=True raises, as in ggn_vp()
    ggn = DatasetHessian(model, data, needed_by="ggn_vp_over()", keep=False, matrix="ggn",
                         seed=seed, loss=loss, layers=layers, training=training,
                         batch_size=batch_size, scores=False)
    return finish(ggn.request, ggn.product(checked_vector(ggn.request, vector)))
