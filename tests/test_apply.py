"""gradkit.apply against fit's own step (train_on_batch) and against w - lr * g.

Two fresh models with the same weights and the same optimizer config: one trains with
``train_on_batch``, the other with ``apply(model, gradients(model, x, y, training=True))``;
weights and optimizer variables must agree after several steps.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradkit as gk
from gradkit._select import unique_keys
from conftest import (
    assert_same_state,
    run_mirrored_step_worker,
    state_snapshot,
    to_numpy,
    trained_stateful_model,
)

RNG = np.random.default_rng(4)
X = RNG.normal(size=(8, 4)).astype("float32")
Y = RNG.normal(size=(8, 3)).astype("float32")


@pytest.fixture
def policy(keras, flavour):
    """Set a global dtype policy for one test and always restore the default."""
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy(None if flavour == "tf_keras" else "float32")


def _model(keras, name="mlp"):
    return keras.Sequential(name=name, layers=[
        keras.Input((4,)),
        keras.layers.Dense(6, activation="tanh", name="d1"),
        keras.layers.Dense(3, name="d2"),
        keras.layers.Activation("linear", dtype="float32", name="out"),  # float32 loss
    ])


def _twins(keras, make_optimizer):
    """Two compiled models with the same weights, each with its own optimizer."""
    first, second = _model(keras), _model(keras)
    second.set_weights(first.get_weights())
    first.compile(optimizer=make_optimizer(), loss="mse")
    second.compile(optimizer=make_optimizer(), loss="mse")
    return first, second


def _optimizer_state(model, flavour):
    optimizer = model.optimizer
    variables = optimizer.variables() if callable(optimizer.variables) else optimizer.variables
    values = [to_numpy(v) for v in variables]
    if flavour == "tf_keras" and hasattr(optimizer, "dynamic_counter"):  # its scale state
        values += [to_numpy(optimizer.loss_scale), to_numpy(optimizer.dynamic_counter)]
    return values


def _assert_same_step(fitted, applied, flavour, rtol, atol):
    for a, b, v in zip(fitted.get_weights(), applied.get_weights(), fitted.weights):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, err_msg=v.name)
    ours, theirs = _optimizer_state(applied, flavour), _optimizer_state(fitted, flavour)
    assert len(ours) == len(theirs) > 1
    for i, (a, b) in enumerate(zip(theirs, ours)):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, err_msg=f"optimizer variable {i}")


OPTIMIZERS = {
    "sgd_momentum": lambda k: k.optimizers.SGD(0.1, momentum=0.9),
    "adam": lambda k: k.optimizers.Adam(0.05),
    "sgd_clipnorm": lambda k: k.optimizers.SGD(0.5, clipnorm=0.05),  # the optimizer's clipping
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_apply_takes_the_step_fit_takes(keras, flavour, name):
    fitted, applied = _twins(keras, lambda: OPTIMIZERS[name](keras))
    for _ in range(3):
        fitted.train_on_batch(X, Y)
        gk.apply(applied, gk.gradients(applied, X, Y, training=True))
    # JAX's fit step is one jitted program, apply's runs op by op: rounding may differ.
    _assert_same_step(fitted, applied, flavour, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["sgd_momentum", "adam"])
def test_apply_with_a_loss_scale_optimizer_under_mixed_float16(keras, flavour, policy, name):
    policy("mixed_float16")
    fitted, applied = _twins(keras, lambda: keras.mixed_precision.LossScaleOptimizer(
        OPTIMIZERS[name](keras)))
    for _ in range(3):
        fitted.train_on_batch(X, Y)
        gk.apply(applied, gk.gradients(applied, X, Y, training=True))
    _assert_same_step(fitted, applied, flavour, rtol=1e-3, atol=1e-4)  # float16 arithmetic
    scale = (applied.optimizer.loss_scale if flavour == "tf_keras"
             else applied.optimizer.scale_loss(1.0))
    assert float(to_numpy(scale)) > 1  # the scale was live: a second division would show


@pytest.mark.flavours("tensorflow", "tf_keras", "jax")
def test_a_model_built_for_two_devices_gets_the_gradients_and_step_of_one(flavour):
    """Built in a MirroredStrategy's scope (TF, tf-keras; JAX: DataParallel), called outside
    and inside it: the same gradients and Adam step as without the devices, and every
    replica's copy of the weights and slots equal (tf-keras applied from outside the
    replicas moved its slots once per replica and left the copies apart)."""
    run_mirrored_step_worker(flavour, "apply")


def test_sgd_step_is_w_minus_lr_g_and_a_subset_moves_only_its_variables(keras):
    model = _model(keras)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    model.train_on_batch(X, Y)  # built by fit (on JAX, its buffers donated)
    grads = gk.gradients(model, X, Y)
    before = [to_numpy(v) for v in model.trainable_variables]
    iterations = int(to_numpy(model.optimizer.iterations))

    subset = {k: g for k, g in grads.items() if "/d1/" in k or k.startswith("d1/")}
    subset[next(k for k in grads if k not in subset)] = None  # None counts as absent
    assert len(subset) == 3
    gk.apply(model, subset)
    for key, v, w0 in zip(grads, model.trainable_variables, before):
        expected = w0 - 0.5 * grads[key] if subset.get(key) is not None else w0
        np.testing.assert_allclose(to_numpy(v), expected, rtol=1e-6, atol=1e-7, err_msg=key)
    assert int(to_numpy(model.optimizer.iterations)) == iterations + 1
    model.train_on_batch(X, Y)  # fit still runs after apply


def test_an_optimizer_given_is_used_and_built_on_every_variable(keras):
    model = _model(keras)
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    grads = gk.gradients(model, X, Y)
    w0 = [to_numpy(v) for v in model.trainable_variables]
    sgd = keras.optimizers.SGD(0.25)
    first = dict(list(grads.items())[:2])  # the first call sees a subset only
    gk.apply(model, first, optimizer=sgd)
    gk.apply(model, grads, optimizer=sgd)  # every variable: it was built on all of them
    for i, (key, v) in enumerate(zip(grads, model.trainable_variables)):
        steps = 2 if key in first else 1
        np.testing.assert_allclose(to_numpy(v), w0[i] - steps * 0.25 * grads[key],
                                   rtol=1e-6, atol=1e-7, err_msg=key)
    assert int(to_numpy(model.optimizer.iterations)) == 0  # the compiled Adam did nothing


def _bad_cases(keras, model, grads):
    key = next(iter(grads))
    nan = grads[key].copy()
    nan.flat[0] = np.nan
    other = _model(keras, name="other")
    other.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    other.train_on_batch(X, Y)  # its optimizer is built on its own variables
    return [
        (dict(grads, **{"stateful/d9/kernel": grads[key]}), {}, gk.InvalidArgumentError,
         r"name no trainable variable.*'stateful/d9/kernel'.*Received: key="),
        ({**grads, key: grads[key].T}, {}, gk.InvalidArgumentError,
         r"has shape \(\d+, \d+\), but the variable has shape.*Received: "),
        ({**grads, key: nan}, {}, gk.NonFiniteGradientError,
         r"hold NaN or Inf.*Nothing was applied.*Received: key="),
        ({**grads, key: grads[key].astype("complex64")}, {}, gk.InvalidArgumentError,
         r"not a real number type"),
        ({**grads, key: grads[key].astype("float64") * 1e300}, {}, gk.NonFiniteGradientError,
         r"NaN or Inf \(in their dtype\)"),
        (list(grads.values()), {}, gk.InvalidArgumentError, r"takes a gradient set"),
        ({k: None for k in grads}, {}, gk.InvalidArgumentError, r"empty or all None"),
        (grads, {"optimizer": "adam"}, gk.InvalidArgumentError,
         r"optimizer= must be an optimizer.*Received: optimizer='adam'"),
        (grads, {"optimizer": other.optimizer}, gk.InvalidArgumentError,
         r"built for other variables.*Received: optimizer="),
    ]


def test_bad_gradients_raise_and_change_nothing(keras):
    model, x, y = trained_stateful_model(keras)  # Adam slots, BatchNorm statistics, metrics
    grads = gk.gradients(model, x, y, training=True)
    before = state_snapshot(model)
    for bad, options, error, message in _bad_cases(keras, model, grads):
        with pytest.raises(error, match=message):
            gk.apply(model, bad, **options)
        assert_same_state(before, state_snapshot(model))
    gk.apply(model, grads)  # the good set does move the weights
    assert not all(np.array_equal(a, b) for a, b in zip(before, state_snapshot(model)))


def test_an_overflowing_loss_scale_raises_and_changes_nothing(keras, flavour):
    if flavour == "tf_keras":
        pytest.skip("tf-keras' LossScaleOptimizer takes unscaled gradients: no overflow")
    model = _model(keras)
    model.compile(optimizer=keras.mixed_precision.LossScaleOptimizer(
        keras.optimizers.SGD(0.1)), loss="mse")
    model.train_on_batch(X, Y)
    grads = gk.gradients(model, X, Y)
    key = next(iter(grads))
    grads[key] = np.full_like(grads[key], 1e36)  # finite, but not times 2**15
    before = state_snapshot(model)
    with pytest.raises(gk.NonFiniteGradientError, match=r"times the loss scale 32768 overflows"):
        gk.apply(model, grads)
    assert_same_state(before, state_snapshot(model))


def test_no_optimizer_is_a_clear_error(keras):
    model = _model(keras)  # never compiled
    grads = {k: np.zeros(tuple(v.shape), "float32")
             for k, v in zip(unique_keys(model.trainable_variables), model.trainable_variables)}
    with pytest.raises(gk.InvalidArgumentError,
                       match=r"has no optimizer.*Received: optimizer=None"):
        gk.apply(model, grads)
