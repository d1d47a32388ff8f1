"""Streaming per-example gradient statistics in one pass, pure NumPy.

Per-example gradients arrive in chunks ``{key: array (n, *variable shape)}``. Each chunk's
count, mean and sum of squared deviations (M2) are merged into the running ones with Chan et
al.'s parallel form of Welford's update, in float64, so a dataset of any length is summarized
exactly once, with constant memory and without the cancellation of ``E[g²] - E[g]²``::

    δ = mean_b - mean_a,   n = n_a + n_b
    mean = mean_a + δ n_b / n,   M2 = M2_a + M2_b + δ² n_a n_b / n

The gradient noise scale is McCandlish et al. (2018), "An Empirical Model of Large-Batch
Training", B_simple = tr(Σ) / |G|², with the unbiased estimators of their appendix A taken at
B_small = 1 (per-example) and B_big = n (the whole dataset)::

    S    = n/(n-1) (mean_i |g_i|² - |ḡ|²)   = tr(Σ̂)  (sum of the unbiased variances)
    |G|² = (n |ḡ|² - mean_i |g_i|²)/(n-1)   = |ḡ|² - S/n
    B_simple = S / |G|²      (inf when the noise swamps the signal, |G|² <= 0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gradkit._detect import flavour_of
from gradkit._errors import InvalidArgumentError, received
from gradkit._objective import resolve_objective
from gradkit._per_example import per_example_gradients
from gradkit._progress import Progress, check_progress
from gradkit._request import floatx, result_dtype
from gradkit._seeds import fold, resolve_seed
from gradkit._select import layer_of
from gradkit._sources import BatchStream


@dataclass(frozen=True)
class Summary:
    """Scalar statistics of one variable, one layer, or all selected variables together.

    ``norm_of_mean`` = |ḡ|; ``mean_example_norm`` = mean_i |g_i|;
    ``trace_variance`` = tr(Σ̂) (unbiased); ``snr`` = |ḡ|² / tr(Σ̂);
    ``noise_scale`` = B_simple = tr(Σ̂) / |G|²_unbiased.
    """

    norm_of_mean: float
    mean_example_norm: float
    trace_variance: float
    snr: float
    noise_scale: float


@dataclass(frozen=True)
class GradientStats:
    """Statistics of per-example gradients over a whole dataset.

    ``mean``, ``variance`` (per-example, elementwise, unbiased: ddof=1), ``second_moment``
    (mean of g_i², elementwise) and ``snr`` (elementwise mean² / variance) are gradient sets
    ``{variable key: array}`` that every other gradkit tool accepts. ``variables``, ``layers``
    and ``total`` hold `Summary` scalars per variable, per layer (variables grouped by the
    part of their key before the last ``/``) and over all selected variables.
    """

    count: int
    mean: dict[str, np.ndarray]
    variance: dict[str, np.ndarray]
    second_moment: dict[str, np.ndarray]
    snr: dict[str, np.ndarray]
    variables: dict[str, Summary]
    layers: dict[str, Summary]
    total: Summary

    def __repr__(self) -> str:
        t = self.total
        return (f"GradientStats(count={self.count}, variables={len(self.variables)}, "
                f"layers={len(self.layers)}, norm_of_mean={t.norm_of_mean:.4g}, "
                f"mean_example_norm={t.mean_example_norm:.4g}, snr={t.snr:.4g}, "
                f"noise_scale={t.noise_scale:.4g})")


class MomentAccumulator:
    """Running count, mean, M2 and norms of per-example gradients (see module docstring)."""

    def __init__(self) -> None:
        self.count = 0
        self._mean: dict[str, np.ndarray] = {}
        self._m2: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._norm_sums: dict[str, float] = {}  # per group ("var:key", "layer:name", "total")

    def update(self, per_example: dict[str, np.ndarray]) -> None:
        """Merge one chunk ``{key: array (n, ...)}`` (all keys share n) into the totals."""
        sizes = {key: np.shape(g)[0] if np.ndim(g) else None for key, g in per_example.items()}
        if not per_example or len(set(sizes.values())) != 1 or None in sizes.values():
            raise InvalidArgumentError(
                "Per-example gradients must be a non-empty dict of arrays that share one "
                "leading example axis. " + received(sizes=sizes)
            )
        if self._mean and set(per_example) != set(self._mean):
            raise InvalidArgumentError(
                "Every chunk must hold the same variables as the first one. "
                + received(keys=sorted(per_example), expected=sorted(self._mean))
            )
        n_b = next(iter(sizes.values()))
        if n_b == 0:
            return
        squares = {}
        for key, g in per_example.items():
            g64 = np.asarray(g, dtype=np.float64)
            self._dtypes.setdefault(key, result_dtype(np.asarray(g).dtype))
            self._merge(key, n_b, g64)
            squares[key] = np.sum(g64.reshape(n_b, -1) ** 2, axis=1)
        self._add_norms(squares)
        self.count += n_b

    def _merge(self, key: str, n_b: int, g: np.ndarray) -> None:
        mean_b = g.mean(axis=0)
        m2_b = np.sum((g - mean_b) ** 2, axis=0)
        if key not in self._mean:
            self._mean[key], self._m2[key] = mean_b, m2_b
            return
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self._mean[key]
        self._mean[key] = self._mean[key] + delta * (n_b / n)
        self._m2[key] = self._m2[key] + m2_b + delta**2 * (n_a * n_b / n)

    def _add_norms(self, squares: dict[str, np.ndarray]) -> None:
        groups: dict[str, np.ndarray] = {}
        for key, sq in squares.items():
            for group in (f"var:{key}", f"layer:{layer_of(key)}", "total"):
                groups[group] = groups.get(group, 0.0) + sq
        for group, sq in groups.items():
            self._norm_sums[group] = self._norm_sums.get(group, 0.0) + float(np.sum(np.sqrt(sq)))

    def result(self) -> GradientStats:
        """The statistics so far; needs at least two examples (the variance is unbiased)."""
        n = self.count
        if n < 2:
            raise InvalidArgumentError(
                "Gradient statistics need at least 2 examples (the per-example variance "
                "divides by n - 1). Pass more data. " + received(examples=n)
            )
        variance = {k: m2 / (n - 1) for k, m2 in self._m2.items()}
        second = {k: self._m2[k] / n + mean**2 for k, mean in self._mean.items()}
        keys = list(self._mean)
        layers: dict[str, list[str]] = {}
        for key in keys:
            layers.setdefault(layer_of(key), []).append(key)
        cast = self._cast
        return GradientStats(
            count=n,
            mean=cast(self._mean),
            variance=cast(variance),
            second_moment=cast(second),
            snr=cast({k: _ratio(self._mean[k] ** 2, variance[k]) for k in keys}),
            variables={k: self._summary([k], variance, f"var:{k}") for k in keys},
            layers={name: self._summary(ks, variance, f"layer:{name}")
                    for name, ks in layers.items()},
            total=self._summary(keys, variance, "total"),
        )

    def _summary(self, keys: list[str], variance: dict, group: str) -> Summary:
        n = self.count
        mean_sq = sum(float(np.sum(self._mean[k] ** 2)) for k in keys)
        trace = sum(float(np.sum(variance[k])) for k in keys)
        signal = mean_sq - trace / n  # unbiased |G|²
        return Summary(
            norm_of_mean=float(np.sqrt(mean_sq)),
            mean_example_norm=self._norm_sums[group] / n,
            trace_variance=trace,
            snr=float(_ratio(np.float64(mean_sq), np.float64(trace))),
            noise_scale=trace / signal if signal > 0 else float("inf"),
        )

    def _cast(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=self._dtypes[k]) for k, v in values.items()}


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator; a zero denominator gives inf (or nan when both are zero)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.true_divide(numerator, denominator)


def gradient_stats(
    model: Any,
    data: Any,
    *,
    loss: Any = None,
    layers: Any = None,
    training: bool = False,
    seed: int | None = None,
    progress: bool = True,
    batch_size: int | None = None,
) -> GradientStats:
    """Statistics of the per-example gradients over every example of `data`, in one pass.

    Per-example gradient i is ``per_example_gradients()``'s row i: the gradient of example
    i's own loss (times its sample weight), plus ``model.losses`` (regularizers) in full,
    so ``stats.mean`` is the gradient of the MEAN loss over the dataset (what
    ``accumulate()`` returns). ``stats.variance`` is the per-example variance (elementwise,
    unbiased, ddof=1), ``stats.second_moment`` the mean of g_i², ``stats.snr`` mean² /
    variance; each is a ``{variable path: array}`` set other gradkit tools accept.
    ``stats.variables`` / ``stats.layers`` / ``stats.total`` hold the L2 norm of the mean,
    the mean per-example norm, tr(Σ), the signal-to-noise ratio |ḡ|² / tr(Σ) and the
    gradient noise scale B_simple = tr(Σ) / |G|² (McCandlish et al. 2018, unbiased
    estimators; inf when the noise swamps the signal). Loss scaling is undone; float32
    (float64 for float64 variables).

    `data` as in ``accumulate()``; merged batch by batch with Chan's parallel Welford
    update in float64, so memory holds one batch of per-example gradients. Needs at least
    two examples. ``seed``: with ``training=True``, the dropout masks as in ``accumulate()``
    (each batch its own, drawn from it; None: fresh). No model state changes.
    """
    check_progress(progress)
    flavour = flavour_of(model)
    stream = BatchStream(model, data, batch_size, flavour, floatx(flavour))
    resolve_objective(model, loss, None, stream.first[1].y, scores=False)  # fail before any work
    call_seed = resolve_seed(seed, training)
    moments = MomentAccumulator()
    with Progress(stream.total, progress, description="gradkit.gradient_stats") as bar:
        for index, (_, batch) in enumerate(stream):
            moments.update(per_example_gradients(
                model, batch.x, batch.y, loss=loss, layers=layers,
                sample_weight=batch.sample_weight, training=training,
                seed=fold(call_seed, index)))
            bar.update(batch.size)
    return moments.result()
