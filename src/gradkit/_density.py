"""`hessian_density()`: the eigenvalue density of the dataset Hessian, by stochastic Lanczos
quadrature (Lin, Saad and Yang 2016; Ghorbani, Krishnan and Xiao 2019, as PyHessian).

For H (P × P) with eigenpairs (λ_j, q_j) the density is φ(t) = (1/P) Σ_j δ(t − λ_j). For a
unit vector v, m Lanczos steps from v give a tridiagonal T = U diag(θ) Uᵀ, and the Gauss
quadrature Σ_k τ_k f(θ_k), τ_k = U[0, k]², equals vᵀ f(H) v for every polynomial f of degree
below 2m. For a normalized Rademacher v, E[(q_jᵀ v)²] = 1/P, so the nodes θ and weights τ,
averaged over runs, estimate φ without bias in every moment below 2m; a Gaussian of width
sigma around each node gives a smooth curve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gradkit._dataset_hessian import DatasetHessian
from gradkit._errors import InvalidArgumentError, check_count, received


@dataclass(frozen=True, repr=False)
class SpectralDensity:
    """``density`` (points,) on ``grid`` (points,): Σ over nodes of weight × a Gaussian of
    width ``sigma``, averaged over runs (integrates to 1). ``nodes``, ``weights``: (runs, m)
    Ritz values and quadrature weights (each row sums to 1; a run whose Krylov space closed
    before m steps is padded with zero weights). ``hvps``: products used."""

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float
    hvps: int

    def __repr__(self) -> str:
        live = self.nodes[self.weights > 0]
        return (f"SpectralDensity(runs={len(self.nodes)}, nodes in [{live.min():.4g}, "
                f"{live.max():.4g}], sigma={self.sigma:.3g}, hvps={self.hvps})")

    def plot(self, ax: Any = None, *, log: bool = True) -> Any:
        """Draw the density on a matplotlib Axes (a new figure's if None); returns it.
        ``log``: a logarithmic density axis (the bulk near 0 dwarfs the outliers)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots()
        ax.plot(self.grid, self.density)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(max(self.density.max() * 1e-10, 1e-300), self.density.max() * 2)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        return ax


def hessian_density(model: Any, data: Any, *, iterations: int = 80, runs: int = 1,
                    grid: Any = 1000, sigma: float | None = None, seed: int | None = None,
                    loss: Any = None, target: Any = None, layers: Any = None,
                    training: bool = False, matrix: str = "hessian",
                    batch_size: int | None = None) -> SpectralDensity:
    """The eigenvalue density of the dataset Hessian by stochastic Lanczos quadrature.

    H (or ``matrix="ggn"``), `data`, ``loss``, ``target``, ``layers``, ``training`` as in
    ``hessian_eigenvalues()``. Each of `runs` runs is `iterations` Lanczos steps (one product
    each; at most P, the number of selected weights) with full reorthogonalization, from a
    normalized Rademacher vector drawn with ``seed`` (and, with ``training=True``, the
    dropout masks, as in ``hessian_eigenvalues()``). ``sigma``: the width of the Gaussian
    around each node (None: 1 % of the range of the nodes). ``grid``: a number of points
    spanning the nodes ± 5 sigma, or the points themselves. Returns a `SpectralDensity`
    (with ``.plot()``); no model state changes.
    """
    check_count("iterations", iterations, 2)
    check_count("runs", runs, 1)
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float))
                              or not sigma > 0):
        raise InvalidArgumentError(
            "sigma= must be a positive number (the width of each node's Gaussian, in "
            "eigenvalue units) or None. " + received(sigma=sigma))
    points = _check_grid(grid)
    hessian = DatasetHessian(model, data, needed_by="hessian_density()", keep=True, seed=seed,
                             matrix=matrix, loss=loss, target=target, layers=layers,
                             training=training, batch_size=batch_size)
    rng, steps = np.random.default_rng(seed), min(iterations, hessian.size)
    quadratures = [_lanczos(hessian.matvec, rng.choice([-1.0, 1.0], hessian.size), steps)
                   for _ in range(runs)]
    nodes, weights = (np.array([q[i] for q in quadratures]) for i in (0, 1))
    live = nodes[weights > 0]
    width = float(live.max() - live.min())
    sigma = float(sigma) if sigma is not None else 0.01 * (width or max(abs(live.max()), 1.0))
    if not isinstance(points, np.ndarray):
        points = np.linspace(live.min() - 5 * sigma, live.max() + 5 * sigma, points)
    gauss = np.exp(-0.5 * ((points[:, None] - nodes.ravel()[None, :]) / sigma) ** 2)
    density = gauss @ weights.ravel() / (runs * sigma * np.sqrt(2 * np.pi))
    return SpectralDensity(points, density, nodes, weights, sigma, hessian.products)


def _lanczos(matvec, start: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(Ritz values, quadrature weights), `steps` long, of Lanczos from `start` with full
    reorthogonalization; padded with zero weights if the Krylov space closes early."""
    basis = [start / np.linalg.norm(start)]
    alphas, betas = [], []
    for _ in range(steps):
        w = matvec(basis[-1])
        alphas.append(float(basis[-1] @ w))
        q = np.array(basis)
        for _ in range(2):  # twice is enough (Kahan, Parlett)
            w = w - q.T @ (q @ w)
        beta = float(np.linalg.norm(w))
        scale = max(max(abs(a) for a in alphas), max(betas, default=0.0))
        if len(alphas) == steps or beta <= 1e-10 * scale:
            break
        betas.append(beta)
        basis.append(w / beta)
    tridiagonal = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    values, vectors = np.linalg.eigh(tridiagonal)
    pad = steps - len(values)
    return (np.concatenate([values, np.full(pad, values[0])]),
            np.concatenate([vectors[0] ** 2, np.zeros(pad)]))


def _check_grid(grid: Any) -> Any:
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool) and grid >= 2:
        return int(grid)
    try:
        array = None if isinstance(grid, (str, bool)) else np.asarray(grid, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim != 1 or array.size < 2 or not np.all(np.isfinite(array)):
        raise InvalidArgumentError(
            "grid= must be a number of points (an int of at least 2) or a 1-D array of "
            "finite eigenvalue points. " + received(grid=grid))
    return array
