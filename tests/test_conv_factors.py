"""Convolutions in factored form (gradkit._factors._conv) against a loop of gradients().

Each model's conv kernels must come back from the adapter as (input, output gradient) factors,
and the rows built from them must equal gradients() on single examples, for every padding,
stride, dilation, rank and layout Keras has; the norms must equal the materialized ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from _per_example_models import quartic
from test_norms import materialized_norms
from test_per_example import assert_same_sets, loop_reference

import gradkit as gk

N = 5
RNG = np.random.default_rng(5)


def conv_model(keras, input_shape, *convs, shared=False):
    inputs = keras.Input(input_shape)
    hidden = inputs
    for i, conv in enumerate(convs):
        hidden = conv(hidden)
        if shared and i == 0:
            hidden = conv(hidden)  # the same layer again: its calls add up
    pooled = (keras.layers.GlobalAveragePooling1D() if len(input_shape) == 2 else
              keras.layers.GlobalAveragePooling2D() if len(input_shape) == 3 else
              keras.layers.GlobalAveragePooling3D())
    outputs = keras.layers.Dense(2, name="out")(pooled(hidden))
    model = keras.Model(inputs, outputs)
    model.compile(loss="mse")
    x = RNG.normal(size=(N, *input_shape)).astype("float32")
    return model, x, RNG.normal(size=(N, 2)).astype("float32")


def cases(keras, flavour):
    conv1, conv2, conv3 = keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D
    t1, t2, t3 = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                  keras.layers.Conv3DTranspose)
    sep1, sep2 = keras.layers.SeparableConv1D, keras.layers.SeparableConv2D
    found = {
        "2d valid": conv_model(keras, (7, 6, 2), conv2(3, 3, activation="tanh")),
        "2d same stride 2 (odd sizes)": conv_model(
            keras, (7, 5, 2), conv2(3, (3, 2), strides=2, padding="same", activation="relu")),
        "2d same dilated": conv_model(
            keras, (6, 6, 1), conv2(2, 3, dilation_rate=2, padding="same", activation="tanh")),
        "1d causal dilated": conv_model(
            keras, (9, 3), conv1(2, 3, dilation_rate=2, padding="causal", activation="tanh")),
        "1d same stride 2 then valid": conv_model(
            keras, (10, 2), conv1(3, 4, strides=2, padding="same", activation="tanh"),
            conv1(2, 2, activation="relu")),
        "3d valid": conv_model(keras, (4, 4, 3, 1), conv3(2, 2, activation="tanh")),
        "2d shared": conv_model(
            keras, (6, 6, 2), conv2(2, 3, padding="same", activation="tanh"), shared=True),
        "2d one channel per group under a wide row (patches laid out along it)": conv_model(
            keras, (4, 20, 2), conv2(4, 3, groups=2, activation="tanh")),
        "2d grouped, same dilated, then 3 groups valid": conv_model(
            keras, (6, 6, 4), conv2(6, 3, groups=2, padding="same", dilation_rate=2,
                                    activation="tanh"),
            conv2(3, 2, groups=3, activation="relu")),
        "2d transposed stride 2": conv_model(
            keras, (3, 4, 2), t2(3, 2, strides=2, activation="tanh")),
        "2d transposed same, stride 2 over kernel 3": conv_model(
            keras, (3, 3, 2), t2(2, 3, strides=2, padding="same", activation="tanh")),
        "2d transposed kernel 1 under stride 2": conv_model(
            keras, (3, 3, 2), t2(2, 1, strides=2)),
        "2d transposed same, output_padding 1": conv_model(
            keras, (3, 4, 2), t2(2, 3, strides=2, padding="same", output_padding=1,
                                 activation="tanh")),
        "2d transposed valid, output_padding (2, 1) under stride 3": conv_model(
            keras, (3, 3, 2), t2(2, 3, strides=3, output_padding=(2, 1), activation="tanh")),
        "1d transposed valid, then a Conv1D": conv_model(
            keras, (5, 2), t1(3, 3, activation="tanh"), conv1(2, 2, activation="relu")),
        "3d transposed stride 2": conv_model(
            keras, (2, 2, 2, 1), t3(2, 2, strides=2, activation="tanh")),
        "2d separable, multiplier 2, same stride 2": conv_model(
            keras, (6, 5, 2), sep2(3, 3, strides=2, padding="same", depth_multiplier=2,
                                   activation="tanh")),
        "1d separable dilated, no bias, shared": conv_model(
            keras, (9, 2), sep1(2, 3, dilation_rate=2, padding="same", use_bias=False,
                                activation="tanh"), shared=True),
        "2d transposed shared": conv_model(
            keras, (3, 3, 2), t2(2, 3, padding="same", activation="tanh"), shared=True),
    }
    if flavour in ("jax", "torch"):  # TensorFlow's CPU convolutions are channels-last only
        found["2d channels_first"] = conv_model(
            keras, (2, 6, 5), conv2(3, 3, strides=(1, 2), data_format="channels_first",
                                    activation="tanh"))
        found["2d transposed channels_first, grouped"] = conv_model(
            keras, (2, 3, 4), t2(4, 2, strides=(2, 1), data_format="channels_first",
                                 activation="tanh"),
            conv2(4, 2, groups=2, data_format="channels_first", activation="tanh"))
        found["2d separable channels_first"] = conv_model(
            keras, (2, 5, 5), sep2(3, 2, depth_multiplier=2, data_format="channels_first",
                                   activation="tanh"))
        # (TensorFlow's CPU transposed convolutions take no dilation)
        found["2d transposed dilated same"] = conv_model(
            keras, (3, 3, 2), t2(2, 2, dilation_rate=2, padding="same", activation="tanh"))
        # output_padding=0 with a dilation (the one Keras allows): an even span under "same"
        # gives an output one shorter than the input
        found["2d transposed dilated same, output_padding 0, one shorter"] = conv_model(
            keras, (3, 4, 2), t2(2, (2, 4), dilation_rate=3, padding="same", output_padding=0,
                                 activation="tanh"))
        found["1d transposed dilated valid, output_padding 0"] = conv_model(
            keras, (4, 2), t1(3, 3, dilation_rate=2, output_padding=0, activation="tanh"))
    return found


def test_conv_rows_and_norms_match_the_loop(keras, flavour):
    from gradkit._factors import Factor
    from gradkit._request import prepare

    for name, (model, x, y) in cases(keras, flavour).items():
        gk.gradients(model, x, y)  # builds the compiled loss on every flavour
        variables = [v for layer in model.layers if "Conv" in type(layer).__name__
                     for v in layer.trainable_weights]
        request = prepare(model, x, y).replace(variables=variables)
        parts = request.adapter.per_example_parts(request)
        assert all(isinstance(p, Factor) and p.geometry is not None for p in parts), name
        rows = gk.per_example_gradients(model, x, y)
        assert_same_sets(rows, loop_reference(model, x, y), rtol=2e-5, atol=2e-6)
        norms = materialized_norms(rows)
        np.testing.assert_allclose(gk.per_example_norms(model, x, y), norms, rtol=1e-5,
                                   err_msg=name)
        if any(kind in name for kind in ("grouped", "transposed", "separable")):  # their sums
            assert_clipped_sums(model, x, y, rows, norms, name)


def with_moving_statistics(model):
    """Moving means and variances away from 0 and 1, so the factors must use them."""
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            size = layer.moving_mean.shape[0]
            layer.moving_mean.assign(RNG.normal(size=size).astype("float32"))
            layer.moving_variance.assign(RNG.uniform(0.3, 3.0, size=size).astype("float32"))
    return model


def depthwise_and_normalization_cases(keras, flavour):
    L = keras.layers
    dense_input = keras.Input((5,))
    hidden = L.BatchNormalization(center=False, name="bn_flat")(L.Dense(4, name="d")(dense_input))
    flat = keras.Model(dense_input, L.Dense(2, name="out")(hidden))
    flat.compile(loss="mse")
    found = {
        "2d same stride 2, multiplier 2, BN": conv_model(
            keras, (7, 6, 3), L.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2,
                                                activation="tanh", name="dw"),
            L.BatchNormalization(name="bn")),
        "2d valid dilated, bias, BN without scale": conv_model(
            keras, (8, 7, 2), L.DepthwiseConv2D((2, 3), dilation_rate=2, use_bias=True,
                                                activation="relu", name="dw"),
            L.BatchNormalization(scale=False, name="bn")),
        "2d shared": conv_model(keras, (6, 6, 2), L.DepthwiseConv2D(3, padding="same",
                                                                    activation="tanh"),
                                shared=True),
        "BN after Dense": (flat, RNG.normal(size=(N, 5)).astype("float32"),
                           RNG.normal(size=(N, 2)).astype("float32")),
    }
    if hasattr(L, "DepthwiseConv1D"):
        found["1d same, multiplier 3"] = conv_model(
            keras, (9, 2), L.DepthwiseConv1D(3, padding="same", depth_multiplier=3,
                                             activation="tanh"))
    if flavour in ("jax", "torch"):  # TensorFlow's CPU convolutions are channels-last only
        found["2d channels_first, BN on axis 1"] = conv_model(
            keras, (3, 6, 5), L.DepthwiseConv2D(3, strides=(1, 2), data_format="channels_first",
                                                activation="tanh"),
            L.BatchNormalization(axis=1))
    return {name: (with_moving_statistics(model), x, y) for name, (model, x, y) in found.items()}


def einsum_and_layer_normalization_cases(keras):
    from _zoo_models import attention

    L = keras.layers
    inputs = keras.Input((5, 4))
    h = L.EinsumDense("abc,cd->abd", output_shape=(5, 6), bias_axes="d", activation="tanh",
                      name="proj")(inputs)
    h = L.LayerNormalization(name="ln")(h)
    h = L.EinsumDense("abc,dc->abd", output_shape=(5, 6), bias_axes="d",  # kernel (out, in)
                      kernel_regularizer=keras.regularizers.L2(0.3), name="swapped")(h)
    h = L.EinsumDense("abc,cde->abde", output_shape=(5, 2, 3), bias_axes="de",
                      kernel_regularizer=keras.regularizers.L2(0.2), name="heads")(h)
    h = L.EinsumDense("...b,bc->...c", output_shape=3, bias_axes="c", name="elided")(h)
    h = L.LayerNormalization(center=False, name="ln_scale_only")(h)
    sequence = keras.Model(inputs, L.Dense(2, name="out")(L.Flatten()(h)))
    sequence.compile(loss="mse")
    attention_model, x, y = attention(keras, batch=N)
    images = keras.Input((6, 6, 2))
    h = L.GroupNormalization(groups=2, name="gn")(L.Conv2D(4, 3, activation="relu")(images))
    h = L.GroupNormalization(groups=1, center=False, name="gn_whole")(
        L.Conv2D(2, 3, padding="same", activation="tanh")(h))
    grouped = keras.Model(images, L.Dense(2, name="out")(L.GlobalAveragePooling2D()(h)))
    grouped.compile(loss="mse")
    return {"EinsumDense and LayerNormalization": (
                sequence, RNG.normal(size=(N, 5, 4)).astype("float32"),
                RNG.normal(size=(N, 2)).astype("float32")),
            "MultiHeadAttention": (attention_model, x, y),
            "GroupNormalization": (grouped, RNG.normal(size=(N, 6, 6, 2)).astype("float32"),
                                   RNG.normal(size=(N, 2)).astype("float32"))}


@pytest.mark.parametrize("cases", [depthwise_and_normalization_cases,
                                   lambda keras, flavour: einsum_and_layer_normalization_cases(
                                       keras)], ids=["depthwise/batchnorm", "einsum/layernorm"])
def test_factored_layers_rows_norms_and_clipped_sums_match_the_loop(keras, flavour, cases):
    """Depthwise kernels, inference BatchNormalization, EinsumDense, Layer- and
    GroupNormalization come back as factors (MultiHeadAttention's projections too); rows,
    norms and clipped sums from them equal gradients() on single examples."""
    from gradkit._factors import Factor, write_rows
    from gradkit._request import prepare

    for name, (model, x, y) in cases(keras, flavour).items():
        reference = loop_reference(model, x, y)
        request = prepare(model, x, y)
        parts = request.adapter.per_example_parts(request)
        for part, key in zip(parts, reference):
            out = np.empty_like(reference[key])
            assert isinstance(part, Factor), (name, key)
            assert write_rows(part, out), (name, key)
            # float32 rounding through LayerNormalization's backward pass differs between
            # the vectorized pass and a batch of one by up to 5e-5 (TensorFlow, tf-keras)
            np.testing.assert_allclose(out, reference[key], rtol=1e-4, atol=5e-5,
                                       err_msg=f"{name}: {key}")
        rows = gk.per_example_gradients(model, x, y)
        assert_same_sets(rows, reference, rtol=1e-4, atol=5e-5)
        norms = materialized_norms(rows)
        np.testing.assert_allclose(gk.per_example_norms(model, x, y), norms, rtol=1e-5,
                                   err_msg=name)
        assert_clipped_sums(model, x, y, rows, norms, name)


def assert_clipped_sums(model, x, y, rows, norms, name):
    """clipped_gradients without noise equals the mean of the rows clipped to 0.1."""
    clipped = gk.clipped_gradients(model, x, y, l2_norm_clip=0.1, noise_multiplier=0.0)
    factor = np.minimum(1.0, 0.1 / norms)
    for key, value in rows.items():
        expected = np.tensordot(factor, value.astype("float64"), 1) / N
        np.testing.assert_allclose(clipped[key], expected, rtol=1e-4, atol=1e-7,
                                   err_msg=f"{name}: {key}")


def test_customized_convolutions_are_differentiated_directly(keras, flavour):
    """Rows equal the loop on every route. TensorFlow's and JAX's vectorizers would form
    their kernel rows as grouped convolutions, many times slower than a loop: not taken.
    torch's vmap runs them (Keras' channels-last layout query kept out of it), faster than
    the loop."""
    from gradkit._factors import plan
    from gradkit._request import prepare
    from gradkit._routes import route_of

    class Scaled(keras.layers.Conv2D):  # its own call: not the Conv2D the factors know
        def call(self, inputs):
            return 0.5 * super().call(inputs)

    model, x, y = conv_model(
        keras, (5, 5, 2),
        Scaled(2, 2, activation="tanh", name="customized"),
        keras.layers.Conv2D(2, 3, activation="tanh", name="plain"))
    gk.gradients(model, x, y)
    request = prepare(model, x, y, layers=["customized"])
    assert plan(model, request.variables, request.adapter.layers_module) == []
    expected = loop_reference(model, x, y)
    if flavour == "torch":
        import sys

        keras_nn = sys.modules["keras.src.backend.torch.nn"]
        layout = keras_nn._maybe_convert_to_channels_last
    assert_same_sets(gk.per_example_gradients(model, x, y), expected, rtol=2e-5, atol=2e-6)
    route = route_of(prepare(model, x, y))
    if flavour != "torch":
        assert "'customized'" in route.reason and "grouped convolutions" in route.reason
        return
    assert route.reason is None  # tried first, and it ran: no failure recorded
    assert keras_nn._maybe_convert_to_channels_last is layout  # Keras' own helper is back


def test_regularized_layers_add_the_regularizer_gradient_to_every_row(keras, monkeypatch):
    """Row i = factor row + ∇R(W) (in the loss of a batch of one, not through z) for Keras'
    L1(a), L2(c), L1L2(a, c) (a·sign(W) + 2c·W) and a custom regularizer, taken by the
    framework's own autodiff: at exact zeros (a zero bias, zeroed kernel entries) |w| has the
    slope the loop gives it; none with target=, whose score holds no model losses; taken
    once per call, not per chunk."""
    from gradkit._factors import Factor, plan
    from gradkit._data import slice_batch
    from gradkit._request import prepare

    L, regularizers = keras.layers, keras.regularizers
    model, x, y = conv_model(
        keras, (6, 6, 2),
        L.Conv2D(3, 3, kernel_regularizer=regularizers.L2(0.2), bias_regularizer=quartic(keras),
                 activation="tanh", name="c"),
        L.Conv2D(2, 3, kernel_regularizer="l2", bias_regularizer=regularizers.L1L2(l2=0.3),
                 use_bias=True, activation="relu", name="b"),
        L.Conv2D(2, 1, kernel_regularizer=regularizers.L1L2(l1=0.05, l2=0.1),
                 bias_regularizer=regularizers.L1(0.2), activation="tanh", name="l1"))
    model.get_layer("b").bias.assign(RNG.normal(size=2).astype("float32"))
    bias = RNG.normal(size=3).astype("float32")
    model.get_layer("c").bias.assign(bias)
    kernel = RNG.normal(size=(1, 1, 2, 2)).astype("float32")
    kernel[0, 0, 1, 0] = 0.0
    model.get_layer("l1").kernel.assign(kernel)  # its bias stays at zero
    gk.gradients(model, x, y)
    request = prepare(model, x, y)
    assert {entry.layer.name for entry in plan(model, request.variables,
                                               request.adapter.layers_module)} >= {"c", "b", "l1"}
    parts = dict(zip(gk.gradients(model, x, y), request.adapter.per_example_parts(request)))
    assert all(isinstance(p, Factor) for p in parts.values())
    assert [k for k, p in parts.items() if p.offset is not None] == [
        "c/kernel", "c/bias", "b/kernel", "b/bias", "l1/kernel", "l1/bias"]
    np.testing.assert_allclose(parts["c/kernel"].offset,
                               0.4 * model.get_layer("c").kernel.numpy(), rtol=1e-6)
    np.testing.assert_allclose(parts["c/bias"].offset, 0.4 * bias ** 3, rtol=1e-5)
    nonzero = kernel != 0
    np.testing.assert_allclose(parts["l1/kernel"].offset[nonzero],
                               0.05 * np.sign(kernel[nonzero]) + 0.2 * kernel[nonzero],
                               rtol=1e-6)
    rows = gk.per_example_gradients(model, x, y)
    assert_same_sets(rows, loop_reference(model, x, y), rtol=2e-5, atol=2e-6)
    norms = materialized_norms(rows)
    np.testing.assert_allclose(gk.per_example_norms(model, x, y), norms, rtol=1e-5)
    assert_clipped_sums(model, x, y, rows, norms, "regularized")
    target = gk.per_example_gradients(model, x, target=0)
    assert_same_sets(target, loop_reference(model, x, target=0), rtol=2e-5, atol=2e-6)
    calls, gradients_of = [], type(request.adapter).regularizer_gradients
    monkeypatch.setattr(type(request.adapter), "regularizer_gradients",
                        lambda self, *args: calls.append(1) or gradients_of(self, *args))
    call = prepare(model, x, y)  # its chunks, as per_example_gradients(chunk_size=2) runs them
    chunks = [request.adapter.per_example_parts(call.replace(batch=slice_batch(
        call.batch, start, min(start + 2, N)))) for start in range(0, N, 2)]
    assert len(calls) == 1  # once per call, not once per chunk
    for chunk in chunks:
        np.testing.assert_array_equal(chunk[0].offset, parts["c/kernel"].offset)


@pytest.mark.parametrize("one_example_per_block", [False, True])
@pytest.mark.parametrize("padding", ["valid", "same", "causal"])
@pytest.mark.parametrize("channels,length", [(2, 9), (1, 24), (6, 24)])
def test_kernel_rows_against_a_direct_sum(padding, one_example_per_block, channels, length,
                                          monkeypatch):
    """Framework-free: g_W[k, c, o] = Σ_t a_pad[t*s + k*dil, c] δ[t, o], summed by hand.
    One channel over a long row takes the patches laid out along the row, six the
    channels-last layout (gradkit._factors._conv._blockwise)."""
    from gradkit._factors import _conv
    from gradkit._factors._conv import Geometry, kernel_rows

    if one_example_per_block:
        monkeypatch.setattr(_conv, "PATCH_BLOCK_BYTES", 1)

    stride, dilation, k = (2, 1, 3) if padding != "causal" else (1, 2, 3)
    a = RNG.normal(size=(3, 1, length, channels))
    span = (k - 1) * dilation + 1
    if padding == "valid":
        size_out, before = (length - span) // stride + 1, 0
    elif padding == "same":
        size_out = -(-length // stride)
        before = max(0, (size_out - 1) * stride + span - length) // 2
    else:
        size_out, before = length, span - 1
    d = RNG.normal(size=(3, 1, size_out, 4))
    out = np.full((3, k, channels, 4), np.nan)
    kernel_rows(a, d, Geometry((k,), (stride,), (dilation,), padding, False), out)
    padded = np.pad(a, [(0, 0), (0, 0), (before, span), (0, 0)])
    expected = np.zeros((3, k, channels, 4))
    for t in range(size_out):
        for j in range(k):
            expected[:, j] += np.einsum("nc,no->nco", padded[:, 0, t * stride + j * dilation],
                                        d[:, 0, t])
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
