"""gradkit.hessian_density (stochastic Lanczos quadrature) against a dense Hessian.

The reference Hessian is built column by column from `gradkit.hvp` on basis vectors
(float64 model) and diagonalized by `numpy.linalg.eigh`. Quadrature facts checked: every
run's weights sum to 1, its nodes lie in [λmin, λmax], with as many steps as weights its
nodes ARE the eigenvalues, and the first moment is vᵀHv/P per run, whose mean over runs
estimates tr(H)/P.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradkit as gk

RNG = np.random.default_rng(31)


def _model(keras):
    """3 -> 4 tanh -> 2, mse: 26 weights, an indefinite Hessian."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(2)])
    rng = np.random.default_rng(2)
    model.set_weights([rng.normal(size=(3, 4)) * 1.5, rng.normal(size=4) * 0.5,
                       rng.normal(size=(4, 2)) * 1.5, rng.normal(size=2) * 0.5])
    model.compile(loss="mse")
    return model, rng.normal(size=(10, 3)), rng.normal(size=(10, 2)) * 3.0


def _dense_hessian(model, x, y) -> np.ndarray:
    template = gk.gradients(model, x, y)
    size = sum(g.size for g in template.values())
    columns = []
    for j in range(size):
        flat, vector, start = np.eye(size)[j], {}, 0
        for key, g in template.items():
            vector[key] = flat[start:start + g.size].reshape(g.shape)
            start += g.size
        columns.append(np.concatenate([np.ravel(h) for h in
                                       gk.hvp(model, x, y, vector=vector).values()]))
    hessian = np.stack(columns, axis=1)
    return (hessian + hessian.T) / 2


def test_quadrature_against_the_dense_hessian(keras, float64):
    model, x, y = _model(keras)
    values = np.linalg.eigvalsh(_dense_hessian(model, x, y))
    size, scale = len(values), np.abs(values).max()

    full = gk.hessian_density(model, (x, y), iterations=size, runs=1, seed=0, batch_size=4)
    np.testing.assert_allclose(np.sort(full.nodes[0]), values, rtol=0, atol=1e-6 * scale)

    result = gk.hessian_density(model, (x, y), iterations=8, runs=30, seed=1)
    assert result.nodes.shape == result.weights.shape == (30, 8)
    assert result.hvps == 30 * 8
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, rtol=1e-10)
    assert result.nodes.min() >= values[0] - 1e-6 * scale
    assert result.nodes.max() <= values[-1] + 1e-6 * scale
    assert result.nodes.min() < 0 < result.nodes.max()  # negative curvature is seen
    # ∫ φ = 1 on the grid, and the first moment: per run vᵀHv/P, mean ≈ tr(H)/P
    step = np.diff(result.grid)
    mass = np.sum((result.density[1:] + result.density[:-1]) / 2 * step)
    np.testing.assert_allclose(mass, 1.0, rtol=1e-3)
    moments = np.sum(result.nodes * result.weights, axis=1)
    spread = moments.std(ddof=1) / np.sqrt(len(moments))
    assert abs(moments.mean() - values.mean()) < 4 * spread
    first = np.sum((result.grid * result.density)[1:] + (result.grid * result.density)[:-1]) \
        / 2 * step[0]
    np.testing.assert_allclose(first, moments.mean(), rtol=1e-3, atol=1e-4 * scale)
    assert repr(result).startswith("SpectralDensity(runs=30, nodes in [")


def test_plot_and_arguments(keras):
    model, x, y = _model(keras)
    grid = np.linspace(-1, 1, 7)
    result = gk.hessian_density(model, (x, y), iterations=3, grid=grid, sigma=0.5, seed=0)
    np.testing.assert_array_equal(result.grid, grid)
    assert result.sigma == 0.5 and result.density.shape == (7,)
    import matplotlib
    import matplotlib.pyplot

    matplotlib.use("Agg")
    ax = result.plot()
    assert ax.get_yscale() == "log" and len(ax.lines) == 1
    matplotlib.pyplot.close(ax.figure)
    for bad, message in [({"iterations": 1}, "iterations=1"), ({"runs": 0}, "runs=0"),
                         ({"sigma": 0}, "sigma=0"), ({"grid": 1}, "grid=1"),
                         ({"grid": "fine"}, "grid='fine'"), ({"matrix": "x"}, "matrix='x'")]:
        with pytest.raises(gk.InvalidArgumentError, match=f"Received: {message}$"):
            gk.hessian_density(model, (x, y), **bad)


def test_seed_fixes_the_dropout_masks_of_training_true(keras):
    """With training=True, `seed` draws the masks too (as in hessian_eigenvalues()): one
    seed, one matrix, the same density; another seed, another matrix."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(6, activation="tanh"),
                              keras.layers.Dropout(0.5), keras.layers.Dense(2)])
    model.compile(loss="mse")
    x, y = RNG.normal(size=(16, 3)), RNG.normal(size=(16, 2))

    def nodes(seed):
        return gk.hessian_density(model, (x, y), iterations=5, seed=seed,
                                  training=True).nodes

    np.testing.assert_array_equal(nodes(3), nodes(3))
    assert not np.allclose(nodes(3), nodes(4))


@pytest.mark.parametrize("seed", ["a", 1.5, -1, [1, 2], True])
def test_every_seed_option_takes_a_non_negative_int(keras, seed):
    """NumPy's default_rng would raise its own errors, or take a list or True silently."""
    model, x, y = _model(keras)
    for call in (lambda: gk.hessian_density(model, (x, y), iterations=3, seed=seed),
                 lambda: gk.hessian_trace(model, (x, y), samples=6, seed=seed),
                 lambda: gk.hessian_eigenvalues(model, (x, y), k=1, seed=seed),
                 lambda: gk.check_gradients(model, x, y, seed=seed)):
        with pytest.raises(gk.InvalidArgumentError, match=r"seed= must be a non-negative int"):
            call()
    classifier = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2,
                                                                        activation="softmax")])
    classifier.compile(loss="sparse_categorical_crossentropy")
    with pytest.raises(gk.InvalidArgumentError, match=r"seed= must be a non-negative int"):
        gk.fisher_diagonal(classifier, (x, np.zeros(len(x), "int32")), kind="true", seed=seed)
