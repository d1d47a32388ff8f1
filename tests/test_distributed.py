"""strategy=: distributed dataset gradients equal one big single-device batch.

Devices and workers are made on this CPU machine, each run in fresh processes started and
stopped here (device counts must be fixed before TensorFlow or JAX starts):
two logical CPU devices for MirroredStrategy, two XLA host devices for JAX sharding, and two
local processes on loopback ports for MultiWorkerMirroredStrategy and jax.distributed. The
worker (tests/_distributed_worker.py) saves the distributed sum and a gradients() reference
on all the data in one batch; the comparisons are made here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gradkit as gk
from gradkit._data import prepare_batch
from gradkit._backends import _cache
from gradkit._distributed import accumulate_distributed
from gradkit._request import prepare

WORKER = Path(__file__).with_name("_distributed_worker.py")
TIMEOUT = 240


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _launch(mode: str, tmp_path: Path, workers: int = 1) -> list[dict]:
    """Run `workers` worker processes of `mode` together; return each one's saved arrays."""
    ports = [str(p) for p in _free_ports(workers)] if workers > 1 else []
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "XLA_FLAGS")}
    procs, outs = [], []
    for rank in range(workers):
        out = tmp_path / f"{mode}_{rank}.npz"
        outs.append(out)
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), mode, str(out), str(rank), *ports],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.communicate()
        pytest.fail(f"{mode}: workers did not finish in {TIMEOUT}s")
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, f"{mode} worker failed:\n{log[-4000:]}"
    return [dict(np.load(out)) for out in outs]


def _check(result: dict, n_expected: int = 16) -> None:
    assert bool(result["state_same"]), "the model state changed"
    names = {key.split("/")[0] for key in result if "/dist/" in key}
    assert names
    for name in sorted(names):
        n = int(result[f"{name}/n"])
        assert n == n_expected, name
        for key in sorted(k for k in result if k.startswith(f"{name}/dist/")):
            reference = result[key.replace("/dist/", "/ref/")]
            # mean objectives: sum of n_b * batch gradient, / N; target=: the plain sum
            got = result[key] / result[f"{name}/divisor"]
            rtol = float(result.get(f"{name}/rtol", 2e-5))  # float16 runs: 1e-2
            np.testing.assert_allclose(got, reference, rtol=rtol, atol=rtol / 10, err_msg=key)


def _shards(result: dict) -> list[list[int]]:
    return json.loads(str(result["shards"]))


@pytest.mark.flavours("tensorflow", "tf_keras")
def test_mirrored_strategy_equals_single_device(flavour, tmp_path):
    mode = "tf_keras_mirrored" if flavour == "tf_keras" else "tf_mirrored"
    (result,) = _launch(mode, tmp_path)
    _check(result)
    # batches of 5, 1, 4, 6 really went to two replicas: uneven and empty shards included
    assert _shards(result)[:4] == [[3, 2], [1, 0], [2, 2], [3, 3]]


@pytest.mark.flavours("tensorflow")
def test_multi_worker_mirrored_strategy_two_processes(tmp_path):
    results = _launch("tf_multiworker", tmp_path, workers=2)
    for result in results:  # each worker passed only its share; both get the whole
        _check(result)
    assert _shards(results[0])[:2] == [[5], [1]]
    assert _shards(results[1])[:3] == [[4], [3], [3]]


@pytest.mark.flavours("jax")
def test_jax_sharded_over_two_devices(tmp_path):
    (result,) = _launch("jax_sharded", tmp_path)
    _check(result)
    # each leaf of the divisible part of a batch is split one half per device
    assert [2, 2] in _shards(result) and [3, 3] in _shards(result)


@pytest.mark.flavours("jax")
def test_jax_two_processes(tmp_path):
    results = _launch("jax_multiprocess", tmp_path, workers=2)
    for result in results:
        _check(result)
    assert [1] in _shards(results[0])  # one example per process per step, sharded
    for result in results:  # unequal batch counts: a clear error on every process, no hang
        assert "ran out of batches at step 1" in str(result["mismatch_error"])


# -- in-process: errors and the one-device path ---------------------------------------------


def _model(keras, loss="mse"):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(loss=loss, optimizer="sgd")
    return model


def _run(model, strategy, x, y, sizes=(2, 3)):
    request = prepare(model, y=y, data=False)
    bounds = np.cumsum((0,) + tuple(sizes))
    batches = [prepare_batch(model, x[a:b], y[a:b], None, "float32")
               for a, b in zip(bounds[:-1], bounds[1:])]
    return accumulate_distributed(request, batches, strategy)


@pytest.mark.flavours("tensorflow", "tf_keras", "jax")
def test_one_device_equals_gradients(keras, flavour):
    if flavour == "jax":
        strategy, model = "data_parallel", _model(keras)
    else:
        import tensorflow as tf

        strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
        with strategy.scope():
            model = _model(keras)
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    y = np.random.default_rng(1).normal(size=(5, 2)).astype("float32")
    reference = _model(keras)
    reference.set_weights(model.get_weights())
    grads, n = _run(model, strategy, x, y)
    assert n == 5
    for got, want in zip(grads, gk.gradients(reference, x, y).values()):
        np.testing.assert_allclose(got / n, want, rtol=1e-5, atol=1e-7)


@pytest.mark.flavours("tensorflow", "tf_keras", "jax")
def test_new_batch_sizes_and_calls_reuse_the_compiled_step(keras, flavour):
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    if flavour == "jax":
        strategy, model = "data_parallel", _model(keras)
    else:
        import tensorflow as tf

        strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
        with strategy.scope():
            model = _model(keras)
    for sizes in [(2, 3), (4, 1), (5,), (1, 1, 3)]:
        _run(model, strategy, x, x[:, :2], sizes)
    (entry,) = _cache.for_model(model).values()  # one step for all calls
    if flavour != "jax":  # the batch axis is relaxed after the second shape: no more traces
        assert entry[1].experimental_get_tracing_count() <= 2  # (connected, tf.function)


@pytest.mark.flavours("tensorflow", "tf_keras")
def test_model_outside_the_strategy_scope_is_refused(keras):
    import tensorflow as tf

    model = _model(keras)
    x = np.zeros((5, 3), "float32")
    with pytest.raises(gk.InvalidArgumentError, match=r"strategy.scope\(\).*Received"):
        _run(model, tf.distribute.OneDeviceStrategy("/cpu:0"), x, x[:, :2])


@pytest.mark.flavours("tensorflow", "tf_keras", "jax")
def test_wrong_strategy_type_is_refused(keras):
    model = _model(keras)
    x = np.zeros((5, 3), "float32")
    with pytest.raises(gk.InvalidArgumentError, match="strategy= takes.*Received"):
        _run(model, "mirrored", x, x[:, :2])


@pytest.mark.flavours("tensorflow", "tf_keras", "jax")
def test_sum_reduction_is_refused(keras):
    loss = keras.losses.MeanSquaredError(reduction="sum")
    model = _model(keras, loss=loss)
    x = np.zeros((5, 3), "float32")
    with pytest.raises(gk.InvalidArgumentError, match="reduction='sum'.*Received"):
        _run(model, "data_parallel", x, x[:, :2])
