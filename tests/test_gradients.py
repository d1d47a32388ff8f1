"""gradkit.gradients against closed forms, on every flavour and model shape.

References are derived by hand (linear models, where the gradient has a closed form) or
computed by NumPy loops; nothing here compares against numbers gradkit printed.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradkit as gk

RNG = np.random.default_rng(0)


def _dense_model(keras, n_in, n_out, *, bias, activation=None, name="dense"):
    inputs = keras.Input((n_in,), name="x")
    outputs = keras.layers.Dense(n_out, use_bias=bias, activation=activation, name=name)(inputs)
    return keras.Model(inputs, outputs)


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def test_mse_linear_closed_form(keras):
    # Keras' mse is the mean over the last axis, then the mean over the batch:
    #   L = 1/(N*out) * sum_ij (XW - y)_ij^2   =>   dL/dW = 2/(N*out) * X^T (XW - y).
    n, n_in, n_out = 6, 4, 3
    x = RNG.normal(size=(n, n_in)).astype("float32")
    y = RNG.normal(size=(n, n_out)).astype("float32")
    w = RNG.normal(size=(n_in, n_out)).astype("float32")
    model = _dense_model(keras, n_in, n_out, bias=False)
    model.get_layer("dense").set_weights([w])
    model.compile(optimizer="sgd", loss="mse")

    grads = gk.gradients(model, x, y)

    xd, yd, wd = (a.astype("float64") for a in (x, y, w))
    expected = 2.0 / (n * n_out) * xd.T @ (xd @ wd - yd)
    assert list(grads) == ["dense/kernel"]
    assert grads["dense/kernel"].dtype == np.float32
    np.testing.assert_allclose(grads["dense/kernel"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("from_logits", [False, True])
def test_softmax_regression_closed_form(keras, from_logits):
    # L = -1/N sum_i log softmax(x_i W + b)[y_i]  =>  dW = X^T (P - Y) / N, db = sum(P - Y) / N.
    n, n_in, n_classes = 8, 5, 4
    x = RNG.normal(size=(n, n_in)).astype("float32")
    labels = RNG.integers(0, n_classes, size=n)
    y = np.eye(n_classes, dtype="float32")[labels]
    w = RNG.normal(size=(n_in, n_classes)).astype("float32") * 0.5
    b = RNG.normal(size=(n_classes,)).astype("float32") * 0.5
    model = _dense_model(keras, n_in, n_classes, bias=True,
                         activation=None if from_logits else "softmax")
    model.get_layer("dense").set_weights([w, b])
    model.compile(loss=keras.losses.CategoricalCrossentropy(from_logits=from_logits))

    grads = gk.gradients(model, x, y)

    p = _softmax(x.astype("float64") @ w + b)
    np.testing.assert_allclose(grads["dense/kernel"], x.T @ (p - y) / n, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["dense/bias"], (p - y).sum(0) / n, rtol=1e-4, atol=1e-6)
    assert list(grads) == ["dense/kernel", "dense/bias"]


def test_keys_shapes_and_order_follow_trainable_variables(keras):
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, name="a"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Dense(2, name="b"),
    ])
    model.compile(loss="mse")
    grads = gk.gradients(model, np.ones((5, 3)), np.zeros((5, 2)))
    variables = model.trainable_variables
    assert list(grads) == [gk._select.variable_key(v) for v in variables]
    assert len(set(grads)) == len(variables) == 6
    for v, g in zip(variables, grads.values()):
        assert g.shape == tuple(v.shape)
        assert isinstance(g, np.ndarray)
    assert all(":0" not in k for k in grads)


def test_target_int_is_sum_of_scores_over_batch(keras):
    # target=k differentiates sum_i (x_i W + b)[k]: dW[:, k] = sum_i x_i, db[k] = N, zero elsewhere.
    n, n_in, n_out = 5, 3, 4
    x = RNG.normal(size=(n, n_in)).astype("float32")
    model = _dense_model(keras, n_in, n_out, bias=True)
    grads = gk.gradients(model, x, target=2)
    expected_w = np.zeros((n_in, n_out))
    expected_w[:, 2] = x.sum(0)
    expected_b = np.zeros(n_out)
    expected_b[2] = n
    np.testing.assert_allclose(grads["dense/kernel"], expected_w, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grads["dense/bias"], expected_b, rtol=1e-6)


def test_target_callable_is_summed_over_batch(keras):
    # target(outputs) = outputs[:, 0] * 3 per example  =>  dW[:, 0] = 3 * sum_i x_i.
    n, n_in = 4, 3
    x = RNG.normal(size=(n, n_in)).astype("float32")
    model = _dense_model(keras, n_in, 2, bias=False)
    grads = gk.gradients(model, x, target=lambda out: out[:, 0] * 3.0)
    expected = np.zeros((n_in, 2))
    expected[:, 0] = 3 * x.sum(0)
    np.testing.assert_allclose(grads["dense/kernel"], expected, rtol=1e-5, atol=1e-6)


def test_target_with_sample_weight_weights_each_score(keras):
    n, n_in = 4, 3
    x = RNG.normal(size=(n, n_in)).astype("float32")
    sw = np.array([1.0, 0.0, 2.0, 0.5], "float32")
    model = _dense_model(keras, n_in, 2, bias=False)
    grads = gk.gradients(model, x, target=1, sample_weight=sw)
    expected = np.zeros((n_in, 2))
    expected[:, 1] = (sw[:, None] * x).sum(0)
    np.testing.assert_allclose(grads["dense/kernel"], expected, rtol=1e-5, atol=1e-6)


def test_backend_tensors_are_accepted(keras, flavour):
    n, n_in = 4, 3
    x = RNG.normal(size=(n, n_in)).astype("float32")
    y = RNG.normal(size=(n, 1)).astype("float32")
    model = _dense_model(keras, n_in, 1, bias=False)
    model.compile(loss="mse")
    convert = (lambda a: __import__("tensorflow").constant(a)) if flavour == "tf_keras" else (
        keras.ops.convert_to_tensor)
    from_tensors = gk.gradients(model, convert(x), convert(y))
    from_numpy = gk.gradients(model, x, y)
    np.testing.assert_allclose(from_tensors["dense/kernel"], from_numpy["dense/kernel"],
                               rtol=1e-6)


def _two_input_model(keras):
    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    da = keras.layers.Dense(1, use_bias=False, name="da")(a)
    db = keras.layers.Dense(1, use_bias=False, name="db")(b)
    out = keras.layers.Add(name="add")([da, db])
    model = keras.Model([a, b], out)
    model.compile(loss="mse")
    return model


@pytest.mark.parametrize("as_dict", [False, True])
def test_multi_input_list_and_dict(keras, as_dict):
    # out = a Wa + b Wb; mse with one output: dWa = 2/N a^T r, dWb = 2/N b^T r, r = out - y.
    n = 5
    a = RNG.normal(size=(n, 3)).astype("float32")
    b = RNG.normal(size=(n, 2)).astype("float32")
    y = RNG.normal(size=(n, 1)).astype("float32")
    model = _two_input_model(keras)
    wa, wb = RNG.normal(size=(3, 1)), RNG.normal(size=(2, 1))
    model.get_layer("da").set_weights([wa])
    model.get_layer("db").set_weights([wb])
    x = {"a": a, "b": b} if as_dict else [a, b]

    grads = gk.gradients(model, x, y)

    r = a @ wa + b @ wb - y
    np.testing.assert_allclose(grads["da/kernel"], 2 / n * a.T @ r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["db/kernel"], 2 / n * b.T @ r, rtol=1e-5, atol=1e-6)


def _two_output_model(keras, loss_weights=None, dict_losses=True):
    inputs = keras.Input((3,), name="x")
    o1 = keras.layers.Dense(2, use_bias=False, name="o1")(inputs)
    o2 = keras.layers.Dense(1, use_bias=False, name="o2")(inputs)
    model = keras.Model(inputs, {"o1": o1, "o2": o2} if dict_losses else [o1, o2])
    losses = {"o1": "mse", "o2": "mae"} if dict_losses else ["mse", "mae"]
    model.compile(loss=losses, loss_weights=loss_weights)
    return model


def _two_output_reference(x, y1, y2, w1, w2, lw1, lw2):
    n = len(x)
    g1 = lw1 * 2.0 / (n * y1.shape[1]) * x.T @ (x @ w1 - y1)
    g2 = lw2 * x.T @ np.sign(x @ w2 - y2) / n
    return g1, g2


@pytest.mark.parametrize("as_dict", [False, True])
def test_two_outputs_two_losses_with_loss_weights(keras, as_dict):
    n = 6
    x = RNG.normal(size=(n, 3)).astype("float32")
    y1 = RNG.normal(size=(n, 2)).astype("float32")
    y2 = RNG.normal(size=(n, 1)).astype("float32") + 5.0  # residual sign is always -1
    weights = {"o1": 0.3, "o2": 2.0} if as_dict else [0.3, 2.0]
    model = _two_output_model(keras, loss_weights=weights, dict_losses=as_dict)
    w1, w2 = RNG.normal(size=(3, 2)), RNG.normal(size=(3, 1)) * 0.1
    model.get_layer("o1").set_weights([w1])
    model.get_layer("o2").set_weights([w2])
    y = {"o1": y1, "o2": y2} if as_dict else [y1, y2]

    grads = gk.gradients(model, x, y)

    g1, g2 = _two_output_reference(x, y1, y2, w1, w2, 0.3, 2.0)
    np.testing.assert_allclose(grads["o1/kernel"], g1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["o2/kernel"], g2, rtol=1e-5, atol=1e-6)


def test_embedding_integer_inputs(keras):
    # out_i = mean_t E[tok_it] . v; mse against y: dE[k] = sum_{i,t: tok=k} 2/N r_i v / T.
    n, steps, vocab, dim = 5, 3, 7, 2
    tokens = RNG.integers(0, vocab, size=(n, steps)).astype("int32")
    y = RNG.normal(size=(n, 1)).astype("float32")
    inputs = keras.Input((steps,), dtype="int32", name="tokens")
    emb = keras.layers.Embedding(vocab, dim, name="emb")(inputs)
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(emb)
    out = keras.layers.Dense(1, use_bias=False, name="head")(pooled)
    model = keras.Model(inputs, out)
    model.compile(loss="mse")
    table = RNG.normal(size=(vocab, dim)).astype("float32")
    v = RNG.normal(size=(dim, 1)).astype("float32")
    model.get_layer("emb").set_weights([table])
    model.get_layer("head").set_weights([v])

    grads = gk.gradients(model, tokens, y)

    r = table[tokens].mean(1) @ v - y  # (n, 1)
    expected = np.zeros((vocab, dim))
    for i in range(n):
        for t in range(steps):
            expected[tokens[i, t]] += 2 / n * r[i, 0] * v[:, 0] / steps
    np.testing.assert_allclose(grads["emb/embeddings"], expected, rtol=1e-5, atol=1e-6)


def test_float64_model_gives_float64_gradients(keras, flavour, float64):
    n = 5
    x = RNG.normal(size=(n, 3))
    y = RNG.normal(size=(n, 2))
    model = _dense_model(keras, 3, 2, bias=False)
    w = RNG.normal(size=(3, 2))
    model.get_layer("dense").set_weights([w])
    model.compile(loss="mse")
    grads = gk.gradients(model, x, y)
    assert grads["dense/kernel"].dtype == np.float64
    # Keras itself runs some float64 ops in float32 on JAX (ops.mean) and torch (matmul), in
    # fit too; on TensorFlow and tf-keras the whole computation is float64.
    rtol = 1e-6 if flavour in ("jax", "torch") else 1e-12
    np.testing.assert_allclose(grads["dense/kernel"], 2 / (n * 2) * x.T @ (x @ w - y),
                               rtol=rtol)


class _Subclassed:
    """A keras.Model subclass with its own call(), made per flavour."""

    @staticmethod
    def make(keras):
        class Tiny(keras.Model):
            def __init__(self):
                super().__init__()
                self.hidden = keras.layers.Dense(3, use_bias=False, name="hidden")
                self.head = keras.layers.Dense(1, use_bias=False, name="head")

            def call(self, inputs):
                return self.head(self.hidden(inputs))

        return Tiny()


def test_subclassed_model_once_built(keras):
    n = 4
    x = RNG.normal(size=(n, 2)).astype("float32")
    y = RNG.normal(size=(n, 1)).astype("float32")
    model = _Subclassed.make(keras)
    model(x[:1])
    model.compile(loss="mse")
    w1, w2 = model.hidden.get_weights()[0], model.head.get_weights()[0]

    grads = gk.gradients(model, x, y)

    r = x @ w1 @ w2 - y
    by_shape = {g.shape: g for g in grads.values()}
    np.testing.assert_allclose(by_shape[(2, 3)], 2 / n * x.T @ r @ w2.T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(by_shape[(3, 1)], 2 / n * (x @ w1).T @ r, rtol=1e-4, atol=1e-6)


def test_subclassed_model_not_built_is_a_clear_error(keras):
    model = _Subclassed.make(keras)
    model.compile(loss="mse")
    with pytest.raises(gk.UnsupportedModelError, match=r"not been built.*Received: "):
        gk.gradients(model, np.ones((2, 2)), np.ones((2, 1)))


@pytest.mark.parametrize("as_dict", [False, True])
def test_loss_argument_on_two_outputs_sums_per_output_losses(keras, as_dict):
    n = 6
    x = RNG.normal(size=(n, 3)).astype("float32")
    y1 = RNG.normal(size=(n, 2)).astype("float32")
    y2 = RNG.normal(size=(n, 1)).astype("float32")
    inputs = keras.Input((3,), name="x")
    o1 = keras.layers.Dense(2, use_bias=False, name="o1")(inputs)
    o2 = keras.layers.Dense(1, use_bias=False, name="o2")(inputs)
    model = keras.Model(inputs, {"o1": o1, "o2": o2} if as_dict else [o1, o2])
    w1, w2 = RNG.normal(size=(3, 2)), RNG.normal(size=(3, 1))
    model.get_layer("o1").set_weights([w1])
    model.get_layer("o2").set_weights([w2])

    grads = gk.gradients(model, x, {"o1": y1, "o2": y2} if as_dict else [y1, y2], loss="mse")

    np.testing.assert_allclose(grads["o1/kernel"], 2 / (n * 2) * x.T @ (x @ w1 - y1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["o2/kernel"], 2 / n * x.T @ (x @ w2 - y2),
                               rtol=1e-5, atol=1e-6)


def test_sparse_labels_closed_form(keras):
    # Integer labels with sparse_categorical_crossentropy: the same X^T (P - Y) / N.
    n, n_in, n_classes = 7, 4, 3
    x = RNG.normal(size=(n, n_in)).astype("float32")
    labels = RNG.integers(0, n_classes, size=n)
    model = _dense_model(keras, n_in, n_classes, bias=True, activation="softmax")
    model.compile(loss="sparse_categorical_crossentropy")
    w, b = model.get_layer("dense").get_weights()
    grads = gk.gradients(model, x, labels)
    p = _softmax(x.astype("float64") @ w + b)
    y = np.eye(n_classes)[labels]
    np.testing.assert_allclose(grads["dense/kernel"], x.T @ (p - y) / n, rtol=1e-4, atol=1e-6)


def test_keys_stay_unique_when_names_repeat(keras):
    # Two nested models may each hold a layer named "d"; tf-keras names both variables
    # "d/kernel". Every variable still gets its own key, in model order, none dropped.
    def branch(name):
        return keras.Sequential(name=name, layers=[keras.Input((3,)),
                                                   keras.layers.Dense(2, name="d")])

    inputs = keras.Input((3,), name="x")
    outputs = keras.layers.Add(name="add")([branch("left")(inputs), branch("right")(inputs)])
    model = keras.Model(inputs, outputs)
    model.compile(loss="mse")
    x = RNG.normal(size=(4, 3)).astype("float32")
    grads = gk.gradients(model, x, np.zeros((4, 2), "float32"))
    assert len(grads) == len(model.trainable_variables) == 4
    assert len(set(grads)) == 4
    # mse against zeros: both branches see the residual out = left(x) + right(x).
    out = model.predict(x, verbose=0)
    for key, variable in zip(grads, model.trainable_variables):
        expected = 2 / (4 * 2) * (x.T @ out if len(variable.shape) == 2 else out.sum(0))
        np.testing.assert_allclose(grads[key], expected, rtol=1e-4, atol=1e-6, err_msg=key)


def test_results_are_writeable_arrays_of_the_caller(keras):
    """Every result is a writeable NumPy array that the caller owns (NumPy's convention; JAX
    hands out its own buffers read-only): changing it in place changes no later result."""
    model = _dense_model(keras, 4, 3, bias=True)
    model.compile(optimizer="sgd", loss="mse")
    x = RNG.normal(size=(5, 4)).astype("float32")
    y = RNG.normal(size=(5, 3)).astype("float32")
    grads = gk.gradients(model, x, y)
    calls = {
        "gradients": lambda: gk.gradients(model, x, y),
        "loss_and_gradients": lambda: gk.loss_and_gradients(model, x, y)[1],
        "input_gradients": lambda: {"x": gk.input_gradients(model, x, y)},
        "activation_gradients": lambda: gk.activation_gradients(model, x, y, layers="dense"),
        "hvp": lambda: gk.hvp(model, x, y, vector=grads),
        "ggn_vp": lambda: gk.ggn_vp(model, x, y, vector=grads),
        "accumulate": lambda: gk.accumulate(model, (x, y)),
        "per_example_gradients": lambda: gk.per_example_gradients(model, x, y),
    }
    for name, call in calls.items():
        first = call()
        kept = {key: np.array(value) for key, value in first.items()}
        for key, value in first.items():
            assert isinstance(value, np.ndarray) and value.flags.writeable, (name, key)
            value *= 0
        for key, value in call().items():  # (per-example routes are timed: last bits)
            np.testing.assert_allclose(value, kept[key], rtol=1e-5, atol=1e-7,
                                       err_msg=f"{name} {key}")


@pytest.mark.flavours("torch")
def test_a_wrapped_torch_module_gets_its_gradients_and_keeps_its_state(keras):
    """keras.layers.TorchModuleWrapper runs its torch module on the module's own parameters,
    which a stateless call cannot hand other values: gradients, per-example rows and a
    Hessian-vector product equal plain autograd through the model's stateful call (in
    training mode too, through a torch BatchNorm), and the module's running statistics and
    parameters stay as they were."""
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5))
    inputs = keras.Input((6,))
    hidden = keras.layers.TorchModuleWrapper(module, output_shape=(None, 5))(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Activation("tanh")(hidden)))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(loss=loss)
    x = RNG.normal(size=(8, 6)).astype("float32")
    y = RNG.integers(0, 3, size=8)
    params = [v.value for v in model.trainable_variables]
    state = [t.clone() for t in [*module.parameters(), *module.buffers()]]

    def autograd(xs, ys, training):
        saved = [b.clone() for b in module.buffers()]
        value = loss(torch.from_numpy(ys), model(torch.from_numpy(xs), training=training))
        grads = torch.autograd.grad(value, params)
        for buffer, kept in zip(module.buffers(), saved):
            buffer.copy_(kept)
        return [g.numpy() for g in grads]

    for training in (False, True):
        got = gk.gradients(model, x, y, training=training)
        for g, want in zip(got.values(), autograd(x, y, training)):
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
    wrapper = model.layers[1]  # its output's gradient, taps and all
    outputs = wrapper(torch.from_numpy(x), training=False)
    outputs.retain_grad()
    loss(torch.from_numpy(y), model.layers[-1](model.layers[-2](outputs))).backward()
    got_outputs = gk.activation_gradients(model, x, y, layers=wrapper)
    np.testing.assert_allclose(next(iter(got_outputs.values())), outputs.grad.numpy(),
                               rtol=1e-5, atol=1e-8)
    rows = gk.per_example_gradients(model, x, y)
    for i in range(len(x)):
        for g, want in zip(rows.values(), autograd(x[i:i + 1], y[i:i + 1], False)):
            np.testing.assert_allclose(g[i], want, rtol=1e-5, atol=1e-7)
    step, differences = 1e-3, []  # the Hessian along all-ones against central differences
    start = [p.detach().clone() for p in params]
    for move in (step, -2 * step):
        with torch.no_grad():
            for p in params:
                p.add_(move)
        differences.append(gk.gradients(model, x, y))
    with torch.no_grad():
        for p, kept in zip(params, start):
            p.copy_(kept)
    product = gk.hvp(model, x, y, vector={key: np.ones_like(g) for key, g in got.items()})
    for key, g in product.items():
        want = (differences[0][key] - differences[1][key]) / (2 * step)
        np.testing.assert_allclose(g, want, rtol=1e-2, atol=1e-4)
    for kept, now in zip(state, [*module.parameters(), *module.buffers()]):
        np.testing.assert_array_equal(kept.detach().numpy(), now.detach().numpy())
