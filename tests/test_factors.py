"""The layer-kind registry (gradkit._factors): complete, and each role's rows writer and
squared norm agree with each other and with rows summed by hand in NumPy.

Framework-free: small random factors, one case (or more) per `Factor.role`.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gradkit._factors import KINDS, Factor, Geometry, squared_rows, weighted_sum, write_rows
from gradkit._factors._registry import ROLES

RNG = np.random.default_rng(17)
N = 4


def normal(*shape):
    return RNG.normal(size=shape).astype("float32")


def dense_kernel(positions, fan_in=3, fan_out=2):
    a, d = normal(N, positions, fan_in), normal(N, positions, fan_out)
    return Factor("kernel", a, d), np.einsum("nti,nto->nio", a, d, dtype=np.float64)


def dense_bias(positions=3):
    d = normal(N, positions, 5)
    return Factor("bias", None, d), d.sum(axis=1, dtype=np.float64)


def embeddings(vocab=6, positions=7):
    ids, d = RNG.integers(0, vocab, size=(N, positions)), normal(N, positions, 3)
    expected = np.zeros((N, vocab, 3))
    for i, t in itertools.product(range(N), range(positions)):
        expected[i, ids[i, t]] += d[i, t]  # repeated ids add up
    return Factor("embeddings", ids, d), expected


#: (kernel_size, strides, dilation, padding, channels_first, input spatial shape)
CONVS = {
    "1d same stride 2": ((3,), (2,), (1,), "same", False, (9,)),
    "1d causal dilated": ((3,), (1,), (2,), "causal", False, (8,)),
    "2d valid dilated": ((2, 3), (1, 2), (2, 1), "valid", False, (7, 8)),
    "2d same channels_first": ((3, 2), (2, 1), (1, 1), "same", True, (5, 6)),
    "3d valid": ((2, 2, 2), (1, 1, 1), (1, 1, 1), "valid", False, (3, 4, 3)),
}


def conv_case(name, calls=2, channels=2, filters=3, groups=1):
    """Random conv factors (`calls` calls of a shared layer) and the padding before each axis."""
    kernel, strides, dilation, padding, first, size = CONVS[name]
    spans = [(k - 1) * r + 1 for k, r in zip(kernel, dilation)]
    if padding == "valid":
        out = [(n - span) // s + 1 for n, span, s in zip(size, spans, strides)]
    else:
        out = [-(-n // s) for n, s in zip(size, strides)]
    totals = [max(0, (o - 1) * s + span - n) for o, s, span, n in zip(out, strides, spans, size)]
    before = {"valid": [0] * len(size), "causal": [span - 1 for span in spans],
              "same": [total // 2 for total in totals]}[padding]
    a, d = normal(N, calls, *size, channels), normal(N, calls, *out, filters)
    geometry = Geometry(kernel, strides, dilation, padding, first, groups)
    if first:  # the factors hold the layer's own layout
        return geometry, np.moveaxis(a, -1, 2), np.moveaxis(d, -1, 2), a, d, before
    return geometry, a, d, a, d, before


def conv_kernel(name, groups=1):
    """g_W[q, c, o] = Σ_calls Σ_p a[p*s + q*dil - before, g*2 + c] δ[p, o], summed by hand,
    with g = o // 3 the group of filter o (2 channels and 3 filters a group)."""
    geometry, a, d, a_last, d_last, before = conv_case(name, channels=2 * groups,
                                                       filters=3 * groups, groups=groups)
    expected = np.zeros((N, *geometry.kernel_size, 2, 3 * groups))
    for call, p in itertools.product(range(a_last.shape[1]), np.ndindex(*d_last.shape[2:-1])):
        for q, g in itertools.product(np.ndindex(*geometry.kernel_size), range(groups)):
            at = [pi * s + qi * r - b for pi, qi, s, r, b in
                  zip(p, q, geometry.strides, geometry.dilation, before)]
            if all(0 <= x < n for x, n in zip(at, a_last.shape[2:-1])):
                expected[(slice(None), *q, slice(None), slice(3 * g, 3 * g + 3))] += np.einsum(
                    "nc,no->nco", a_last[(slice(None), call, *at)][:, 2 * g:2 * g + 2],
                    d_last[(slice(None), call, *p)][:, 3 * g:3 * g + 3])
    return Factor("conv_kernel", a, d, geometry), expected


def separable_kernels(name, multiplier=2):
    """z = P ∘ D(a), summed by hand over every call, position p and kernel offset q:
    g_D[q, c, m] = Σ a[at, c] δ[p, f] P[c*M + m, f]
    g_P[c*M + m, f] = Σ a[at, c] D[q, c, m] δ[p, f]
    """
    from gradkit._factors._conv import Separable

    geometry, a, d, a_last, d_last, before = conv_case(name)
    channels, filters = a_last.shape[-1], d_last.shape[-1]
    depthwise = normal(*geometry.kernel_size, channels, multiplier)
    pointwise = normal(*(1,) * len(geometry.kernel_size), channels * multiplier, filters)
    p_cmf = pointwise.reshape(channels, multiplier, filters).astype(np.float64)
    expected_d = np.zeros((N, *depthwise.shape))
    expected_p = np.zeros((N, channels, multiplier, filters))
    for call, p in itertools.product(range(a_last.shape[1]), np.ndindex(*d_last.shape[2:-1])):
        for q in np.ndindex(*geometry.kernel_size):
            at = [pi * s + qi * r - b for pi, qi, s, r, b in
                  zip(p, q, geometry.strides, geometry.dilation, before)]
            if all(0 <= x < n for x, n in zip(at, a_last.shape[2:-1])):
                a_at = a_last[(slice(None), call, *at)].astype(np.float64)
                d_at = d_last[(slice(None), call, *p)].astype(np.float64)
                expected_d[(slice(None), *q)] += np.einsum("nc,nf,cmf->ncm", a_at, d_at, p_cmf)
                expected_p += np.einsum("nc,cm,nf->ncmf", a_at, depthwise[q], d_at)
    separable = Separable(*geometry[:5], depthwise, pointwise)
    return ((Factor("separable_depthwise", a, d, separable), expected_d),
            (Factor("separable_pointwise", a, d, separable),
             expected_p.reshape(N, *pointwise.shape)))


def transposed_kernel(name):
    """A transposed convolution's kernel gradient is that of the convolution it transposes,
    whose input is the layer's δ and whose output gradient is the layer's input."""
    factor, expected = conv_kernel(name)
    return Factor("transposed_kernel", factor.deltas, factor.inputs, factor.geometry), expected


def conv_bias(name):
    geometry, _, d, _, d_last, _ = conv_case(name)
    summed = d_last.reshape(N, -1, d_last.shape[-1]).sum(axis=1, dtype=np.float64)
    return Factor("conv_bias", None, d, geometry), summed


def depthwise_kernel(name, multiplier):
    """g_K[q, c, m] = Σ_calls Σ_p a[p*s + q*dil - before, c] δ[p, c*multiplier + m]."""
    geometry, a, d, a_last, d_last, before = conv_case(name, filters=2 * multiplier)
    expected = np.zeros((N, *geometry.kernel_size, 2, multiplier))
    for call, p in itertools.product(range(a_last.shape[1]), np.ndindex(*d_last.shape[2:-1])):
        for q in np.ndindex(*geometry.kernel_size):
            at = [pi * s + qi * r - b for pi, qi, s, r, b in
                  zip(p, q, geometry.strides, geometry.dilation, before)]
            if all(0 <= x < n for x, n in zip(at, a_last.shape[2:-1])):
                deltas = d_last[(slice(None), call, *p)].reshape(N, 2, multiplier)
                expected[(slice(None), *q)] += a_last[(slice(None), call, *at)][..., None] * deltas
    return Factor("depthwise_kernel", a, d, geometry), expected


def batch_normalization(role, axis, shape=(2, 3, 4, 5)):
    """(n, calls, *input shape) factors; channels on `axis` of the factors."""
    from gradkit._factors._normalization import Moments

    a, d = normal(N, *shape), normal(N, *shape)
    channels = shape[axis - 1 if axis > 0 else axis]
    mean, variance = RNG.normal(size=channels), RNG.uniform(0.5, 2.0, size=channels)
    moments = Moments(axis, mean, variance, 1e-3)
    a_last, d_last = (np.moveaxis(x, axis, -1).reshape(N, -1, channels).astype(np.float64)
                      for x in (a, d))
    if role == "norm_beta":
        return Factor(role, None, d, moments), d_last.sum(axis=1)
    normalized = (a_last - mean) / np.sqrt(variance + 1e-3)
    return Factor(role, a, d, moments), (d_last * normalized).sum(axis=1)


def layer_normalization(axis, shape=(2, 3, 4, 5), epsilon=1e-3):
    """g_γ[i] = Σ_calls Σ_positions δ ⊙ (a − mean) / √(var + ε), the moments per position."""
    from gradkit._factors._normalization import Features

    a, d = normal(N, *shape), normal(N, *shape)
    last_a, last_d = (np.moveaxis(x, axis, -1).astype(np.float64) for x in (a, d))
    expected = np.zeros((N, last_a.shape[-1]))
    for i in range(N):
        for position in np.ndindex(*last_a.shape[1:-1]):
            row = last_a[(i, *position)]
            normalized = (row - row.mean()) / np.sqrt(row.var() + epsilon)
            expected[i] += last_d[(i, *position)] * normalized
    return Factor("ln_gamma", a, d, Features(axis, epsilon)), expected


def group_normalization(axis, groups=2, shape=(2, 3, 4, 6), epsilon=1e-3):
    """Per example and call, each group normalized over its positions and channels."""
    from gradkit._factors._normalization import Groups

    a, d = normal(N, *shape), normal(N, *shape)
    last_a, last_d = (np.moveaxis(x, axis, -1).astype(np.float64) for x in (a, d))
    channels = last_a.shape[-1]
    size = channels // groups
    expected = np.zeros((N, channels))
    for i, call, group in itertools.product(range(N), range(shape[0]), range(groups)):
        block = last_a[i, call, ..., group * size:(group + 1) * size]
        normalized = (block - block.mean()) / np.sqrt(block.var() + epsilon)
        deltas = last_d[i, call, ..., group * size:(group + 1) * size]
        expected[i, group * size:(group + 1) * size] += (deltas * normalized).reshape(
            -1, size).sum(axis=0)
    return Factor("gn_gamma", a, d, Groups(axis, groups, epsilon)), expected


#: (equation, input shape without the batch, output shape without it, bias shape or None)
EINSUMS = {
    "dense-like": ("abc,cd->abd", (3, 4), (3, 5), (5,)),
    "heads": ("abc,cde->abde", (3, 4), (3, 2, 5), (2, 5)),
    "output projection": ("abcd,cde->abe", (3, 2, 4), (3, 5), None),
    "bias broadcast on an axis": ("abc,cde->abde", (3, 4), (3, 2, 5), (2, 1)),
    "left ellipsis": ("...b,bc->...c", (2, 3, 4), (2, 3, 5), (5,)),
}


def einsum_case(name, calls=2):
    from gradkit._factors._einsum import Einsum

    equation, in_shape, out_shape, bias_shape = EINSUMS[name]
    inputs, rest = equation.split(",")
    kernel, output = rest.split("->")
    a, d = normal(N, calls, *in_shape), normal(N, calls, *out_shape)
    return Einsum(inputs, kernel, output, bias_shape), equation, a, d


def einsum_kernel(name):
    """Each example alone, as a batch of one: einsum(inputs, output -> kernel) per call."""
    geometry, equation, a, d = einsum_case(name)
    inputs, rest = equation.split(",")
    kernel, output = rest.split("->")
    alone = f"{inputs},{output}->{kernel}"

    def one(x, delta):  # NumPy wants an ellipsis in the output: "...b,bc->...c" by hand
        if inputs.startswith("..."):
            return x.reshape(-1, x.shape[-1]).T @ delta.reshape(-1, delta.shape[-1])
        return np.einsum(alone, x[None], delta[None])

    expected = np.stack([sum(one(a[i, c], d[i, c]).astype(np.float64)
                             for c in range(a.shape[1])) for i in range(N)])
    return Factor("einsum_kernel", a, d, geometry), expected


def einsum_bias(name):
    geometry, _, a, d = einsum_case(name)
    shape = geometry.bias_shape
    expected = np.zeros((N, *shape))
    for i, c in itertools.product(range(N), range(d.shape[1])):
        for position in np.ndindex(*d.shape[2:]):  # δ added into its broadcast bias entry
            target = tuple(0 if size == 1 else p
                           for p, size in zip(position[len(position) - len(shape):], shape))
            expected[(i, *target)] += d[(i, c, *position)]
    return Factor("einsum_bias", None, d, geometry), expected


#: Per Factor.role, its cases: name -> () -> (factor, rows summed by hand).
CASES = {
    "kernel": {"one position": lambda: dense_kernel(1), "Gram form": lambda: dense_kernel(3),
               "product form": lambda: dense_kernel(8, 2, 2)},
    "bias": {"positions": dense_bias},
    "embeddings": {"repeated ids": embeddings,  # repeats added one by one, or
                   "many repeated ids": lambda: embeddings(3, 24),  # summed by reduceat
                   "ids mostly distinct": lambda: embeddings(500, 4)},
    "conv_kernel": {**{name: lambda name=name: conv_kernel(name) for name in CONVS},
                    **{f"{name}, 2 groups": lambda name=name: conv_kernel(name, groups=2)
                       for name in CONVS}},
    "transposed_kernel": {name: lambda name=name: transposed_kernel(name) for name in CONVS},
    "separable_depthwise": {name: lambda name=name: separable_kernels(name)[0]
                            for name in CONVS},
    "separable_pointwise": {name: lambda name=name: separable_kernels(name)[1]
                            for name in CONVS},
    "conv_bias": {name: lambda name=name: conv_bias(name) for name in CONVS},
    "depthwise_kernel": {f"{name} x{m}": lambda name=name, m=m: depthwise_kernel(name, m)
                         for name in CONVS for m in (1, 2)},
    "bn_gamma": {f"axis {axis}": lambda axis=axis: batch_normalization("bn_gamma", axis)
                 for axis in (-1, 2)},
    "norm_beta": {f"axis {axis}": lambda axis=axis: batch_normalization("norm_beta", axis)
                for axis in (-1, 2)},
    "ln_gamma": {f"axis {axis}": lambda axis=axis: layer_normalization(axis) for axis in (-1, 2)},
    "gn_gamma": {"axis -1, 2 groups": lambda: group_normalization(-1, groups=2),
                 "axis 2, 3 groups of one": lambda: group_normalization(2, groups=3)},
    "einsum_kernel": {name: lambda name=name: einsum_kernel(name) for name in EINSUMS},
    "einsum_bias": {name: lambda name=name: einsum_bias(name) for name in EINSUMS
                    if EINSUMS[name][3] is not None},
}
#: Keras names a depthwise kernel's regularizer after the layer, not the attribute, and a
#: separable convolution's after its stage
REGULARIZER_PREFIX = {"kernel": ("kernel", "depthwise"), "depthwise_kernel": ("depthwise",),
                      "pointwise_kernel": ("pointwise",)}


def test_every_kind_has_a_writer_and_a_squared_norm_per_role():
    roles = list({id(role): role for kind in KINDS.values()  # a role may serve two kinds
                  for role in kind.roles.values()}.values())
    assert len({role.factor for role in roles}) == len(roles)  # a Factor.role names one rule
    assert set(ROLES) == {role.factor for role in roles} == set(CASES)  # and has cases here
    for name, kind in KINDS.items():
        assert kind.name == name and kind.roles, name
        for attribute, role in kind.roles.items():
            assert callable(role.rows) and callable(role.squared) and callable(role.summed), (
                name, attribute)
            assert role.regularizer.startswith(
                REGULARIZER_PREFIX.get(attribute, (attribute,))), (name, attribute)


def test_every_kind_finds_its_classes(keras):
    layers = keras.layers
    for name, kind in KINDS.items():
        classes = kind.classes(layers)
        assert classes and all(isinstance(cls, type) for cls in classes), name


@pytest.mark.parametrize("role, case", [(role, case) for role in CASES for case in CASES[role]])
def test_rows_and_squared_norms_agree_with_numpy(role, case):
    factor, expected = CASES[role][case]()
    out = np.full(expected.shape, np.nan, np.float32)
    assert write_rows(factor, out)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    squared = squared_rows(factor, N)
    assert squared.shape == (N,) and squared.dtype == np.float64
    written = np.einsum("bp,bp->b", out.reshape(N, -1), out.reshape(N, -1), dtype=np.float64)
    np.testing.assert_allclose(squared, written, rtol=1e-5)
    np.testing.assert_allclose(squared, (expected.reshape(N, -1) ** 2).sum(axis=1), rtol=1e-5)


@pytest.mark.parametrize("role, case", [(role, case) for role in CASES for case in CASES[role]])
def test_weighted_sums_agree_with_numpy(role, case):
    factor, expected = CASES[role][case]()
    weights = np.linspace(-0.5, 2.0, N)
    summed = weighted_sum(factor, weights, expected.shape[1:])
    assert summed.shape == expected.shape[1:] and summed.dtype == np.float64
    np.testing.assert_allclose(summed, np.tensordot(weights, expected.astype(np.float64), 1),
                               rtol=1e-5, atol=1e-5)
    first = weighted_sum(factor, weights[:2], expected.shape[1:])  # only the first n rows
    np.testing.assert_allclose(first, np.tensordot(weights[:2], expected[:2], 1),
                               rtol=1e-5, atol=1e-5)
    rows = weighted_sum(expected, weights, expected.shape[1:])  # materialized rows
    np.testing.assert_allclose(rows, summed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("role", sorted(CASES))
def test_only_the_first_n_rows_are_written_and_normed(role):
    factor, expected = next(iter(CASES[role].values()))()
    out = np.full(expected.shape, np.nan, np.float32)
    write_rows(factor, out[:2])
    np.testing.assert_allclose(out[:2], expected[:2], rtol=1e-5, atol=1e-5)
    assert np.isnan(out[2:]).all()
    np.testing.assert_allclose(squared_rows(factor, 2),
                               (expected[:2].reshape(2, -1) ** 2).sum(axis=1), rtol=1e-5)


def test_separable_rows_a_block_of_one_example_at_a_time(monkeypatch):
    """The full convolution's rows are formed a block of examples at a time: blocks of one
    give the hand-summed rows too."""
    from gradkit._factors import _conv

    monkeypatch.setattr(_conv, "PATCH_BLOCK_BYTES", 1)
    for factor, expected in separable_kernels("2d same channels_first"):
        out = np.empty(expected.shape, np.float32)
        assert write_rows(factor, out)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
