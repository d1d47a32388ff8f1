"""JAX: the one jitted gradient program, run on a batch sharded over a device mesh.

The batch axis is sharded over every device of the mesh (`NamedSharding`), the weights are
replicated, and the same jitted function as on one device (`jax.py`) differentiates the
objective of the GLOBAL batch; XLA inserts the all-reduce. A device-resident, replicated
accumulator takes `weight * gradient` inside the same jit and is copied to the host once.

A batch whose size is not a multiple of the device count is cut in two: the largest
divisible part runs sharded and the few remaining examples run replicated, each part
weighted by its size (a mean objective) or by one (a `target=` sum), which adds up to the
batch's own contribution. After `jax.distributed.initialize` the mesh spans every process:
each process passes its own share of the data, the processes' batches of one step form one
global batch, and every process gets the same result.
"""

from __future__ import annotations

import weakref
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gradkit._backends import _cache
from gradkit._backends import _keras3 as k3
from gradkit._backends._accumulator import adder
from gradkit._backends._steps import data_of, gradient_fn
from gradkit._backends.jax import pooled
from gradkit._data import leaves, map_structure
from gradkit._errors import InvalidArgumentError, received


def distributed_sum(engine, request, batches, strategy):
    """(sum over global batches of n_b * gradient of batch b's objective, N)."""
    mesh, axes = resolve_mesh(strategy)
    model = request.model
    connected: list = []  # found while tracing
    connected, step = _cache.cached(model, ("mesh", request.cache_key(), mesh), lambda: (
        connected, jax.jit(pooled(adder(gradient_fn(engine, request, True), engine.p, False,
                                        connected), weakref.ref(model)),
                           out_shardings=NamedSharding(mesh, PartitionSpec()))))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(axes))
    values = k3.variable_values(model)
    _check_same_weights(values[0])
    values = _replicate(values, replicated)
    scale = _replicate(np.float32(k3.loss_scale(model)), replicated)
    acc = _replicate([np.zeros(v.shape, v.dtype) for v in request.variables], replicated)
    total, on_cpu = 0, mesh.devices.flat[0].platform == "cpu"
    for inputs, size in _global_parts(_steps(batches), mesh, sharded, replicated):
        weight = np.float32(1.0 if request.objective.kind == "target" else size)
        acc, _ = step(values, inputs, scale, acc, _replicate(weight, replicated))
        if on_cpu:  # XLA:CPU runs every device's program on one shared thread pool; two
            jax.block_until_ready(acc)  # steps in flight can starve an all-reduce for ever
        total += size
    grads = [np.asarray(a.addressable_data(0)) for a in acc]
    found = connected or [True] * len(grads)
    return [g if ok else None for g, ok in zip(grads, found)], total


def resolve_mesh(strategy: Any) -> tuple[Mesh, tuple[str, ...]]:
    """The device mesh and the mesh axes the batch is sharded over."""
    if isinstance(strategy, str) and strategy == "data_parallel":
        return Mesh(np.array(jax.devices()), ("batch",)), ("batch",)
    if isinstance(strategy, Mesh):
        return strategy, tuple(strategy.axis_names)
    import keras

    if isinstance(strategy, keras.distribution.DataParallel):
        return strategy.device_mesh.backend_mesh, (strategy.batch_dim_name,)
    raise InvalidArgumentError(
        "On JAX, strategy= takes 'data_parallel' (shard each batch over every device, "
        "jax.devices()), a keras.distribution.DataParallel, or a jax.sharding.Mesh (the "
        "batch is sharded over all its axes). Model-parallel layouts are not supported. "
        + received(strategy=strategy)
    )


def _replicate(tree: Any, sharding: NamedSharding) -> Any:
    """Place a pytree on every device of the mesh (of every process)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_callback(np.shape(a), sharding,
                                               lambda index, a=_host(a): a[index]),
        tree)


def _host(value: Any) -> np.ndarray:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return np.asarray(value.addressable_data(0))  # a global array: every copy is equal
    return np.asarray(value)


def _check_same_weights(trainable: list) -> None:
    """With several processes, every process must hold the same weights; raise if not."""
    if jax.process_count() == 1:
        return
    sums = np.array([np.sum(_host(v), dtype=np.float64) for v in trainable])
    gathered = _all_gather(sums)
    differ = [p for p, row in enumerate(gathered) if not np.array_equal(row, gathered[0])]
    if differ:
        raise InvalidArgumentError(
            f"The model's weights differ between JAX processes (process(es) {differ} vs 0), "
            "so their gradients cannot be added. Give every process the same weights: "
            "the same keras.utils.set_random_seed before building the model, or load the "
            "same checkpoint. " + received(processes=jax.process_count())
        )


def _steps(batches) -> Any:
    """Each local batch as a dict of NumPy arrays, then None for ever (exhausted)."""
    for batch in batches:
        yield {k: map_structure(np.asarray, v) for k, v in data_of(batch).items()}
    while True:
        yield None


def _global_parts(steps, mesh, sharded, replicated):
    """(global inputs, global size) for each part of each global batch, in order."""
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    for step, inputs in enumerate(steps):
        size = -1 if inputs is None else len(leaves(inputs["x"])[0])
        sizes = _all_gather(np.array(size, np.int64))
        if np.all(sizes < 0):
            return
        if np.any(sizes < 0):
            raise _exhausted(step, sizes)
        main = int(sizes.min()) // local_devices * local_devices
        if main:
            part = map_structure(lambda a: a[:main], inputs)
            yield map_structure(
                lambda a: jax.make_array_from_process_local_data(sharded, a), part
            ), main * len(sizes)
        rest = _gather_rest(map_structure(lambda a: a[main:], inputs), sizes - main)
        if rest is not None:
            yield _replicate(rest, replicated), int(np.sum(sizes - main))


def _all_gather(value: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return value[None]
    return np.asarray(multihost_utils.process_allgather(value))


def _gather_rest(rest: dict, counts: np.ndarray) -> dict | None:
    """Every process's leftover examples, concatenated in process order, on every process."""
    if not np.any(counts):
        return None
    if jax.process_count() == 1:
        return rest
    width = int(counts.max())

    def pad(a):
        return np.concatenate([a, np.zeros((width - len(a),) + a.shape[1:], a.dtype)])

    gathered = multihost_utils.process_allgather(map_structure(pad, rest))
    return map_structure(
        lambda g: np.concatenate([np.asarray(g)[p, :c] for p, c in enumerate(counts)]),
        gathered,
    )


def _exhausted(step: int, sizes: np.ndarray) -> InvalidArgumentError:
    done = [p for p, s in enumerate(sizes) if s < 0]
    return InvalidArgumentError(
        f"Process(es) {done} ran out of batches at step {step} while others still had "
        "data. With several JAX processes every process must yield the same number of "
        "batches (sizes may differ); give each process an equal number of batches, e.g. "
        "by sharding the batches rather than the examples. " + received(sizes=sizes.tolist())
    )
