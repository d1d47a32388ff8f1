"""The same model, weights and batch give the same gradients on every flavour.

One subprocess per flavour (Keras fixes its backend at import) runs
tests/_cross_backend_worker.py (the session fixture `cross_flavour_results`), which writes its
gradients with gradkit.save; the files are then compared here. Run on the tensorflow flavour
only: the test covers all four itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import gradkit as gk
FLAVOURS = ("tensorflow", "jax", "torch", "tf_keras")
RUNS = ("compiled_training", "compiled_inference", "target")


@pytest.fixture
def written(cross_flavour_results) -> Path:
    return cross_flavour_results


@pytest.mark.flavours("tensorflow")
@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("flavour", FLAVOURS[1:])
def test_same_gradients_as_tensorflow(written, run, flavour):
    reference = gk.load(written / f"tensorflow-{run}.npz")
    other = gk.load(written / f"{flavour}-{run}.npz")
    assert list(other) == list(reference)
    assert len(reference) == 7
    for key, expected in reference.items():
        got = other[key]
        assert got.dtype == expected.dtype == np.float32, key
        assert got.shape == expected.shape, key
        assert np.linalg.norm(expected) > 1e-3, key  # a real gradient, not a zero vector
        error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert error < 1e-5, f"{key}: relative error {error:.2e} on {flavour}"
