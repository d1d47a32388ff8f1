"""Per-example gradients of models that take each adapter's special routes, against the loop.

On every flavour, inference through Keras' own factored layers takes the one-pass route (one
forward and one backward pass over the whole batch); everything else the vectorized one (the
framework's vectorizer over each example's gradient), the compiled loop or the loop. Models whose examples must run alone (a layer mixing the batch, an
activity loss that Keras divides by the batch size) must still give each example's own
gradient, on every flavour.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from _per_example_models import N, sequence, text
from test_per_example import assert_same_sets, loop_reference

import gradkit as gk

RNG = np.random.default_rng(7)


def plain_mlp(keras, **dense_options):
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(6, activation="tanh", name="hidden", **dense_options),
        keras.layers.Dense(3, name="out"),
    ])
    model.compile(loss="mse")
    return model, RNG.normal(size=(N, 4)).astype("float32"), RNG.normal(size=(N, 3)).astype(
        "float32")


def batch_mixing(keras, flavour):
    """A Lambda layer adding half the batch mean: on a batch of one that is 1.5 x the input."""
    if flavour == "tf_keras":
        import tensorflow as tf

        mean = tf.reduce_mean
    else:
        mean = keras.ops.mean
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(6, activation="tanh", name="hidden"),
        keras.layers.Lambda(lambda t: t + 0.5 * mean(t, axis=0, keepdims=True), name="mix"),
        keras.layers.Dense(3, name="out"),
    ])
    model.compile(loss="mse")
    return model, RNG.normal(size=(N, 4)).astype("float32"), RNG.normal(size=(N, 3)).astype(
        "float32")


def test_examples_that_must_run_alone_match_the_loop(keras, flavour):
    for model, x, y in (plain_mlp(keras, activity_regularizer=keras.regularizers.L2(0.3)),
                        batch_mixing(keras, flavour)):
        rows = gk.per_example_gradients(model, x, y)
        assert_same_sets(rows, loop_reference(model, x, y))
        norms = np.sqrt(sum((v.reshape(N, -1).astype("float64") ** 2).sum(1)
                            for v in rows.values()))
        np.testing.assert_allclose(gk.per_example_norms(model, x, y), norms, rtol=1e-5)


def test_dense_only_models_with_weights_targets_and_shared_layers_match_the_loop(keras):
    model, ids, labels = text(keras)
    weights = np.array([0.5, 2.0, 0.0, 1.0, 3.0], "float32")
    assert_same_sets(gk.per_example_gradients(model, ids, labels, sample_weight=weights),
                     loop_reference(model, ids, labels, sample_weight=weights))
    model, x, _ = plain_mlp(keras)
    assert_same_sets(gk.per_example_gradients(model, x, target=1),
                     loop_reference(model, x, target=1))
    model, x, y = sequence(keras)
    assert_same_sets(gk.per_example_gradients(model, x, y), loop_reference(model, x, y))


@pytest.mark.flavours("tensorflow", "jax", "torch")  # tf-keras has no such reduction
def test_a_loss_whose_weights_do_not_add_up_over_examples(keras):
    """"mean_with_sample_weight" divides by the weights' sum: on a batch of one the weight
    cancels, so row i is example i's unweighted loss gradient (unless its weight is 0)."""
    model, x, y = plain_mlp(keras)
    model.compile(loss=keras.losses.MeanSquaredError(reduction="mean_with_sample_weight"))
    weights = np.array([0.5, 2.0, 1.0, 1.0, 3.0], "float32")
    rows = gk.per_example_gradients(model, x, y, sample_weight=weights)
    assert_same_sets(rows, loop_reference(model, x, y, sample_weight=weights))
    assert_same_sets(rows, loop_reference(model, x, y))


def test_inference_through_factored_layers_takes_one_pass(keras, flavour, monkeypatch):
    """Plain inference models get every example's factors from one forward and one backward
    pass over the batch (gradkit._backends._batched): the model itself is never vectorized
    nor looped over. Training mode, or models whose rows are not independent, never take
    that route. Every result equals the loop of single-example gradients."""
    from gradkit import _request
    from gradkit._backends import _batched, _steps
    from gradkit._factors import Factor

    def refuse(name):
        def refused(*args, **kwargs):
            raise AssertionError(f"the {name} route was taken")
        return refused

    model, x, y = plain_mlp(keras)
    expected = loop_reference(model, x, y)
    with monkeypatch.context() as patch:
        patch.setattr(_steps, "per_example_fn", refuse("per-example"))
        request = _request.prepare(model, x, y)
        parts = request.adapter.per_example_parts(request)
        assert all(isinstance(part, Factor) for part in parts)
        assert_same_sets(gk.per_example_gradients(model, x, y), expected)
    monkeypatch.setattr(_batched, "run_batched", refuse("one-pass"))
    assert_same_sets(gk.per_example_gradients(model, x, y, training=True), expected)
    for other, x, y in (plain_mlp(keras, activity_regularizer=keras.regularizers.L2(0.3)),
                        batch_mixing(keras, flavour)):
        assert not _batched.rows_independent(other, False)
        assert_same_sets(gk.per_example_gradients(other, x, y), loop_reference(other, x, y))


def test_one_pass_with_an_unused_output_and_a_partly_unused_shared_layer(keras, flavour):
    """A layer whose output does not reach the objective is named in an error, as on the
    other routes; a shared layer with one call reaching the objective
    and one not is left to the other routes, with the same rows."""
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, activation="tanh", name="shared")
    side = keras.layers.Dense(2, name="side")
    h = shared(inputs)
    unused = side(shared(h))  # the second call of `shared` reaches only the unused output
    model = keras.Model(inputs, [keras.layers.Dense(3, name="out")(h), unused])
    x = RNG.normal(size=(N, 4)).astype("float32")
    first = lambda outputs: outputs[0][:, 1]  # noqa: E731
    with pytest.raises(gk.UnconnectedGradientError, match="side/kernel"):
        gk.per_example_gradients(model, x, target=first)
    rows = gk.per_example_gradients(model, x, target=first, layers=["shared", "out"])
    assert_same_sets(rows, loop_reference(model, x, target=first, layers=["shared", "out"]))


def test_the_faster_route_is_timed_once_and_kept(keras, flavour, monkeypatch):
    """The routes take turns while they are timed; a vectorized route many times slower than
    the others is timed once, then never called again; every call, timed or not, returns
    the real rows."""
    from gradkit import _backends

    model, x, y = plain_mlp(keras)
    expected = loop_reference(model, x, y)
    adapter, calls = _backends.for_flavour(flavour), []
    vectorized, mapped = adapter.per_example_parts, adapter.mapped_parts

    def slow(request):
        calls.append("vectorized")
        time.sleep(0.05 * request.batch.size)
        return vectorized(request)

    def recorded(request):
        calls.append("mapped")
        return mapped(request)

    monkeypatch.setattr(adapter, "per_example_parts", slow)
    monkeypatch.setattr(adapter, "mapped_parts", recorded)
    for _ in range(8):
        assert_same_sets(gk.per_example_gradients(model, x, y), expected)
    assert calls.count("vectorized") == 2  # compiled, timed: over KEEP[0] times the others
    if adapter.maps_examples:
        assert calls[:3] == ["vectorized", "mapped", "vectorized"]


def test_a_close_timing_is_a_tie_won_by_the_route_first_in_order():
    """Timings within TIE of the fastest tie, and the tie goes to the route first in
    ROUTES (one program over the batch before the compiled loop before the plain loop);
    a route faster by more than that is kept."""
    from gradkit import _routes

    route = _routes.Route()
    route.costs = {("rows", "vectorized"): [1.3, 1.12, 1.2, 1.14],
                   ("rows", "mapped"): [1.1, 1.0, 1.05, 1.2], ("rows", "loop"): [4.0]}
    assert _routes._on_trial(route, "rows") == "vectorized"
    route.costs[("rows", "vectorized")] = [1.3, 1.2, 1.16, 1.2]
    assert _routes._on_trial(route, "rows") == "mapped"
    route.costs[("rows", "loop")] = [1.1, 0.99, 1.0, 1.05]  # faster, but within the tie
    assert _routes._on_trial(route, "rows") == "mapped"
    route.reasons["mapped"] = "failed"
    assert _routes._on_trial(route, "rows") == "loop"


def test_the_compiled_loop_and_its_fallback(keras, flavour, monkeypatch, caplog):
    """With the vectorizer failing, the loop compiled over the chunk gives the rows; when it
    fails too, the plain loop does. Each failure is tried and logged once."""
    import logging

    from gradkit import _backends

    model, x, y = plain_mlp(keras)
    expected = loop_reference(model, x, y)
    adapter, tries = _backends.for_flavour(flavour), []

    def failing(name):
        def failed(request):
            tries.append(name)
            raise NotImplementedError(f"no {name} here")
        return failed

    monkeypatch.setattr(adapter, "per_example_parts", failing("vectorized"))
    for _ in range(2):
        assert_same_sets(gk.per_example_gradients(model, x, y, chunk_size=2), expected)
    assert tries == ["vectorized"]  # then the compiled loop, chunk after chunk
    model, x, y = plain_mlp(keras)
    expected, tries[:] = loop_reference(model, x, y), []
    monkeypatch.setattr(adapter, "mapped_parts", failing("mapped"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gradkit"):
        for _ in range(2):
            assert_same_sets(gk.per_example_gradients(model, x, y), expected)
    assert tries == ["vectorized", "mapped"]
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2 and "no mapped here" in messages[1], messages


def test_the_plain_loop_gives_rows_norms_and_clipped_sums(keras, flavour, monkeypatch):
    """With both compiled routes failing, the plain loop (its gradients kept one array per
    example, never stacked) serves every per-example operation: rows, norms and clipped
    sums equal the loop of single-example gradients, and the model's weights are read
    fresh on every call (a changed weight changes the next call's rows)."""
    from gradkit import _backends

    model, x, y = plain_mlp(keras)
    adapter = _backends.for_flavour(flavour)

    def failed(request):
        raise NotImplementedError("not here")

    monkeypatch.setattr(adapter, "per_example_parts", failed)
    monkeypatch.setattr(adapter, "mapped_parts", failed)
    seen = []
    for _ in range(2):  # the second call on the remembered route
        expected = loop_reference(model, x, y)
        seen.append(gk.per_example_gradients(model, x, y, chunk_size=3))
        assert_same_sets(seen[-1], expected)
        flat = np.concatenate([r.reshape(len(x), -1) for r in expected.values()], axis=1)
        norms = np.linalg.norm(flat.astype(np.float64), axis=1)
        np.testing.assert_allclose(gk.per_example_norms(model, x, y), norms, rtol=1e-5)
        clip = float(np.median(norms))
        scale = np.minimum(1.0, clip / norms)
        clipped = gk.clipped_gradients(model, x, y, l2_norm_clip=clip)
        for key, rows in expected.items():
            np.testing.assert_allclose(clipped[key], np.tensordot(scale, rows, 1) / len(x),
                                       rtol=1e-4, atol=1e-7, err_msg=key)
        variable = model.trainable_variables[0]
        variable.assign(np.asarray(variable.numpy()) * 0.5)
    key = next(iter(seen[0]))  # the rows after the change are of the new weights
    assert not np.allclose(seen[0][key], seen[1][key])


def test_the_compiled_loop_draws_each_example_the_loops_dropout_mask(keras, flavour,
                                                                      monkeypatch):
    """training=True with a seed: every example of the compiled loop (on torch a loop inside
    one call, which resets torch's generator before each example) has the mask a batch of
    one gets with that seed, as in the loop of single-example gradients."""
    from gradkit import _backends

    model = keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(16, activation="tanh", name="hidden"),
        keras.layers.Dropout(0.5, name="drop"), keras.layers.Dense(3, name="out")])
    model.compile(loss="mse")
    x, y = RNG.normal(size=(N, 4)).astype("float32"), RNG.normal(size=(N, 3)).astype("float32")
    adapter, routes = _backends.for_flavour(flavour), []

    def no_vectorizer(request):
        raise NotImplementedError("not this route")

    def recorded(request):
        routes.append("mapped")
        return mapped(request)

    mapped = adapter.mapped_parts
    monkeypatch.setattr(adapter, "per_example_parts", no_vectorizer)
    monkeypatch.setattr(adapter, "mapped_parts", recorded)
    expected = loop_reference(model, x, y, training=True, seed=3)
    inference = loop_reference(model, x, y)
    assert not all(np.allclose(expected[k], inference[k]) for k in expected)  # masks drawn
    rows = gk.per_example_gradients(model, x, y, training=True, seed=3)
    assert routes == ["mapped"]
    assert_same_sets(rows, expected)
