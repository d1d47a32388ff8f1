"""gradkit.summary: the per-variable text table, checked against NumPy computed here."""

from __future__ import annotations

import re

import numpy as np
import pytest

import gradkit


def _rows(text):
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()]


def test_rows_hold_shape_norm_mean_and_max_in_dict_order():
    rng = np.random.default_rng(0)
    grads = {"b/kernel": rng.standard_normal((3, 4)), "a/bias": -np.arange(5.0)}
    rows = _rows(gradkit.summary(grads))
    assert rows[0] == ["variable", "shape", "L2 norm", "mean |g|", "max |g|"]
    body = [r for r in rows if r[0] in grads]
    assert [r[0] for r in body] == ["b/kernel", "a/bias"]
    for name, shape, norm, mean, peak in body:
        g = grads[name]
        assert shape == str(g.shape)
        np.testing.assert_allclose([float(norm), float(mean), float(peak)],
                                   [np.sqrt(np.sum(g * g)), np.mean(abs(g)), np.max(abs(g))],
                                   rtol=1e-4)
    total = next(r for r in rows if r[0].startswith("total"))
    assert total[1] == "17 values"
    everything = np.concatenate([g.ravel() for g in grads.values()])
    np.testing.assert_allclose(float(total[2]), np.linalg.norm(everything), rtol=1e-4)


def test_unconnected_and_non_finite_entries_are_shown_not_hidden():
    text = gradkit.summary({"w": np.array([1.0, np.nan]), "v": None})
    rows = {r[0]: r for r in _rows(text)}
    assert rows["w"][2] == "nan"
    assert rows["v"][2] == "unconnected"


def test_a_non_dict_is_refused_with_a_gradkit_error():
    with pytest.raises(gradkit.InvalidArgumentError, match="Received: grads='list'"):
        gradkit.summary([np.ones(3)])
