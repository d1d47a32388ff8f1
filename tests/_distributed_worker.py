"""One process of a distributed gradkit run, started by tests/test_distributed.py.

    python tests/_distributed_worker.py MODE OUT.npz [RANK PORT0 PORT1]

MODE: tf_mirrored | tf_keras_mirrored (two logical CPU devices, MirroredStrategy),
tf_multiworker (MultiWorkerMirroredStrategy, one of two workers; TF_CONFIG on loopback),
jax_sharded (two XLA host devices), jax_multiprocess (one of two jax.distributed processes).

Writes, per objective kind: the distributed sum and N ("<kind>/dist/<key>", "<kind>/n") and
a single-device reference on ALL the data in one batch ("<kind>/ref/<key>", through
gradkit.gradients on a model outside any strategy), plus whether the model state stayed
bitwise equal and the per-replica shard sizes seen. The test makes the comparisons.
"""

from __future__ import annotations

import json
import os
import sys

MODE, OUT = sys.argv[1], sys.argv[2]
RANK = int(sys.argv[3]) if len(sys.argv) > 3 else 0
PORTS = sys.argv[4:]
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
if MODE.startswith("jax"):
    os.environ["KERAS_BACKEND"] = "jax"
    count = 2 if MODE == "jax_sharded" else 1
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
elif MODE.startswith("tf_keras"):
    os.environ.pop("KERAS_BACKEND", None)
else:
    os.environ["KERAS_BACKEND"] = "tensorflow"
if MODE == "tf_multiworker":
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in PORTS]},
        "task": {"type": "worker", "index": RANK},
    })

import numpy as np  # noqa: E402

N_EXAMPLES = 16
# Batches as (start, stop) of the data; every batch is uneven for two replicas or has one
# example, and in multi-worker modes each worker passes only its own share.
SHARES = {
    "single": [(0, 5), (5, 6), (6, 10), (10, 16)],
    "tf_multiworker": [[(0, 5), (5, 6)], [(6, 10), (10, 13), (13, 16)]],
    "jax_multiprocess": [[(0, 5), (5, 6)], [(6, 9), (9, 16)]],
}


def data():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N_EXAMPLES, 3)).astype("float32")
    y = rng.normal(size=(N_EXAMPLES, 2)).astype("float32")
    w = rng.uniform(0.2, 2.0, size=N_EXAMPLES).astype("float32")
    return x, y, w


def build(keras):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.1)),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(2),
    ])
    model.compile(loss="mse", optimizer="sgd")
    return model


def setup():
    """(keras, strategy, model built for it, local batch bounds, shard-size spy list)."""
    spy: list = []
    if MODE.startswith("jax"):
        import jax

        if MODE == "jax_multiprocess":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(f"127.0.0.1:{PORTS[0]}", num_processes=2,
                                       process_id=RANK, initialization_timeout=60)
        import keras

        _spy_jax(spy)
        bounds = SHARES[MODE][RANK] if MODE in SHARES else SHARES["single"]
        return keras, "data_parallel", build(keras), bounds, spy
    import tensorflow as tf

    if MODE == "tf_multiworker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        bounds = SHARES[MODE][RANK]
    else:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        bounds = SHARES["single"]
    if MODE.startswith("tf_keras"):
        import tf_keras as keras
    else:
        import keras
    _spy_tf(strategy, spy)
    with strategy.scope():
        model = build(keras)
    return keras, strategy, model, bounds, spy


def _spy_tf(strategy, spy):
    original = strategy.experimental_distribute_values_from_function

    def recording(fn):
        values = original(fn)
        spy.append([int(t.shape[0]) for t in strategy.experimental_local_results(values["x"])])
        return values

    strategy.experimental_distribute_values_from_function = recording


def _spy_jax(spy):
    import jax

    original = jax.make_array_from_process_local_data

    def recording(sharding, local_data, global_shape=None):
        array = original(sharding, local_data, global_shape)
        spy.append([int(s.data.shape[0]) for s in array.addressable_shards])
        return array

    jax.make_array_from_process_local_data = recording


def snapshot(model):
    """Every weight, statistic, metric and seed-generator state, copied to NumPy."""
    variables = list(model.variables)
    for metric in model.metrics:
        variables.extend(metric.variables)
    for layer in model._flatten_layers():
        variables.extend(g.state for g in getattr(layer, "_seed_generators", []) or [])
    return [np.array(v.numpy()) for v in variables]


def runs(keras, strategy):
    """(name, gradients() options, strategy) for each distributed run of this mode."""
    plain = [
        ("compiled", {}, strategy),
        ("loss", {"loss": keras.losses.MeanAbsoluteError()}, strategy),
        ("target", {"target": 1}, strategy),
    ]
    if MODE != "jax_sharded":
        return plain
    import jax

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    return plain + [
        ("compiled_keras_data_parallel", {}, keras.distribution.DataParallel()),
        ("target_mesh", {"target": 1}, mesh),
    ]


def public_accumulate(model, reference, strategy, x, y, w, bounds):
    """gradkit.accumulate(strategy=...): each worker passes its share, in batches of 5."""
    import gradkit as gk

    lo, hi = bounds[0][0], bounds[-1][1]
    mean = gk.accumulate(model, (x[lo:hi], y[lo:hi], w[lo:hi]), batch_size=5,
                         strategy=strategy, progress=False)
    ref = gk.gradients(reference, x, y, sample_weight=w)
    out = {"accumulate/n": np.array(N_EXAMPLES), "accumulate/divisor": np.array(1)}
    for (key, value), grad in zip(ref.items(), mean.values()):
        out[f"accumulate/ref/{key}"], out[f"accumulate/dist/{key}"] = value, grad
    return out


def mixed_precision(keras, strategy, x, y, w):
    """float16 compute with loss scaling: the replicas' sum must not overflow float16."""
    import gradkit as gk

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with strategy.scope():
            model = build(keras)
        reference = build(keras)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    reference.set_weights(model.get_weights())
    big = np.concatenate([x] * 16), np.concatenate([y] * 16), np.concatenate([w] * 16)
    mean = gk.accumulate(model, big, batch_size=200, strategy=strategy, progress=False)
    ref = gk.gradients(reference, *big[:2], sample_weight=big[2])
    out = {"mixed/n": np.array(N_EXAMPLES), "mixed/divisor": np.array(1),
           "mixed/rtol": np.array(1e-2)}
    for (key, value), grad in zip(ref.items(), mean.values()):
        out[f"mixed/ref/{key}"], out[f"mixed/dist/{key}"] = value, grad
    return out


def main():
    keras, strategy, model, bounds, spy = setup()
    import gradkit as gk
    from gradkit._data import prepare_batch
    from gradkit._distributed import accumulate_distributed
    from gradkit._request import prepare

    x, y, w = data()
    reference = build(keras)
    reference.set_weights(model.get_weights())
    out = {}
    before = snapshot(model)
    for name, options, strat in runs(keras, strategy):
        labels = None if "target" in options else y
        request = prepare(model, y=labels, data=False, **options)
        batches = (prepare_batch(model, x[a:b], None if labels is None else labels[a:b],
                                 w[a:b], "float32") for a, b in bounds)
        grads, n = accumulate_distributed(request, batches, strat)
        ref = gk.gradients(reference, x, labels, sample_weight=w, **options)
        out[f"{name}/n"] = np.array(n)
        out[f"{name}/divisor"] = np.array(1 if "target" in options else n)
        for (key, value), grad in zip(ref.items(), grads):
            out[f"{name}/ref/{key}"] = value
            out[f"{name}/dist/{key}"] = grad
    out.update(public_accumulate(model, reference, strategy, x, y, w, bounds))
    if MODE in ("tf_mirrored", "tf_keras_mirrored"):
        out.update(mixed_precision(keras, strategy, x, y, w))
    # training=True (dropout on): the state must still come back untouched.
    request = prepare(model, y=y, data=False)
    accumulate_distributed(request.replace(training=True),
                           [prepare_batch(model, x, y, None, "float32")], strategy)
    after = snapshot(model)
    out["state_same"] = np.array(all(np.array_equal(a, b) for a, b in zip(before, after)))
    out["shards"] = np.array(json.dumps(spy))
    if MODE == "jax_multiprocess":  # process 1 runs out of batches first: both must raise
        mine = [(0, 4), (4, 8)] if RANK == 0 else [(8, 12)]
        try:
            accumulate_distributed(request, [prepare_batch(model, x[a:b], y[a:b], None,
                                                           "float32") for a, b in mine],
                                   strategy)
        except gk.InvalidArgumentError as error:
            out["mismatch_error"] = np.array(str(error))
    np.savez(OUT, **out)


if __name__ == "__main__":
    main()
