"""tf.distribute: each replica sums the gradients of its shard; one all-reduce at the end.

Used by Keras 3 on TensorFlow and by tf-keras alike: each adapter supplies its replica
gradient (``adapter.replica_gradient(request)``) and its values reader (``adapter.p.values``).
Each batch is split over the worker's local replicas with `strategy.experimental_distribute_values_from_function` (contiguous slices,
sizes differing by at most one, an empty slice when a batch has fewer examples than
replicas); `strategy.run` adds each replica's weighted gradient into that replica's own
accumulator inside a cached `tf.function`; after the last batch one batched all-reduce
(`strategy.extended.batch_reduce_to`, SUM) adds the accumulators and the example counts of
every replica of every worker.

Keras divides a mean-reduced compiled loss (and the regularizers) by the replica count R
inside a replica context, so that `fit`'s summed gradients approximate the global mean
(keras/src/losses/loss.py `scale_loss_for_distribution`; tf-keras `LossesContainer`). A
replica with n_r examples therefore multiplies its gradient by R * n_r, which undoes that
division exactly and gives its share of n_b * gradient(batch mean) even when shards are
uneven. With `loss=`, Keras 3 divides the data loss by R but not the regularizers (the data
loss is multiplied back by R before differentiating) and tf-keras divides neither: the
factor is n_r. A `target=` score is a plain sum: factor 1. The factor is applied after
differentiation, so float16 gradients are never larger than in `fit`.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import tensorflow as tf

from gradkit._backends import _cache
from gradkit._backends._steps import data_of
from gradkit._data import Batch, leaves, map_structure
from gradkit._errors import InvalidArgumentError, received

_SUPPORTED = (
    tf.distribute.MirroredStrategy,
    tf.distribute.MultiWorkerMirroredStrategy,
    tf.distribute.OneDeviceStrategy,
)


def distributed_sum(adapter, request, batches, strategy):
    """(sum over batches of n_b * gradient of batch b's objective, N), all replicas reduced."""
    model, variables = request.model, request.variables
    check_strategy(model, strategy)
    connected, step = _cache.cached(model, ("tf.distribute", request.cache_key(), id(strategy)),
                         lambda: _build(adapter, request, strategy))
    scale = tf.constant(adapter.scale_of(model), tf.float32)
    acc = None
    for batch in batches:
        if acc is None:
            acc = strategy.run(lambda: _zeros(variables))
        acc = step(_distribute(strategy, batch), acc, scale)
    if acc is None:  # no local data: still take part in the all-reduce of the other workers
        acc = strategy.run(lambda: _zeros(variables))
    total = _all_reduce(strategy, acc)
    grads = [g.numpy() if ok else None for g, ok in zip(total[:-1], connected)]
    return grads, int(round(float(total[-1])))


def _all_reduce(strategy: Any, acc: list) -> list:
    """SUM every per-replica accumulator over all replicas of all workers, in one batch."""
    reduced = strategy.extended.batch_reduce_to(
        tf.distribute.ReduceOp.SUM, [(value, value) for value in acc]
    )
    return [strategy.experimental_local_results(r)[0] for r in reduced]


def check_strategy(model: Any, strategy: Any) -> None:
    """Raise unless `strategy` is a supported tf.distribute strategy that owns the model."""
    if not isinstance(strategy, tf.distribute.Strategy):
        raise InvalidArgumentError(
            "On TensorFlow, strategy= takes a tf.distribute strategy, e.g. "
            "tf.distribute.MirroredStrategy() or tf.distribute.MultiWorkerMirroredStrategy(). "
            + received(strategy=strategy)
        )
    if not isinstance(strategy, _SUPPORTED):
        raise InvalidArgumentError(
            f"gradkit distributes with MirroredStrategy, MultiWorkerMirroredStrategy and "
            f"OneDeviceStrategy; {type(strategy).__name__} is not supported (its replicas "
            "are driven differently). Use one of those, or strategy=None. "
            + received(strategy=type(strategy).__name__)
        )
    owned = [_tf_variable(v) for v in model.variables]
    foreign = [v.name for v in owned if not strategy.extended.variable_created_in_scope(v)]
    if foreign:
        raise InvalidArgumentError(
            f"Model {model.name!r} was not created under this strategy's scope, so its "
            f"weights are not mirrored on the replicas ({len(foreign)} variable(s), e.g. "
            f"{foreign[0]!r}). Build and compile the model inside `with strategy.scope():`, "
            "or load it there (keras.saving.load_model inside the scope), then pass the "
            "same strategy. " + received(strategy=type(strategy).__name__)
        )


def _tf_variable(variable: Any) -> Any:
    value = getattr(variable, "value", None)  # a Keras 3 Variable wraps a tf.Variable
    return value if isinstance(value, tf.Variable) else variable


def _zeros(variables: list) -> list:
    return [tf.zeros(v.shape, _tf_variable(v).dtype) for v in variables] + [
        tf.zeros([], tf.float64)
    ]


def _distribute(strategy: Any, batch: Batch) -> Any:
    """The batch as per-replica values: contiguous slices, one per local replica."""
    devices = strategy.extended.worker_devices
    share, extra = divmod(batch.size, len(devices))
    bounds = np.cumsum([0] + [share + (i < extra) for i in range(len(devices))])
    inputs = data_of(batch)

    def shard(context: Any) -> Any:
        local = context.replica_id_in_sync_group % len(devices)
        lo, hi = int(bounds[local]), int(bounds[local + 1])
        with tf.device(devices[local]):
            return map_structure(lambda a: tf.identity(a[lo:hi]), inputs)

    return strategy.experimental_distribute_values_from_function(shard)


def _build(adapter, request, strategy) -> tuple[list, Any]:
    """(connectivity found while tracing, the tf.function of one distributed step)."""
    model_ref, objective = weakref.ref(request.model), request.objective
    gradient, read = adapter.replica_gradient(request), adapter.p.values
    connected: list = []

    def replica_step(inputs, acc, scale):
        n = tf.shape(leaves(inputs["x"])[0])[0]
        count = tf.cast(n, tf.float32)
        replicas = float(tf.distribute.get_replica_context().num_replicas_in_sync)
        grads = gradient(read(model_ref()), inputs, scale, replicas)
        connected[:] = [g is not None for g in grads]
        weight = _weight(objective, replicas, count) / scale
        grads = [tf.zeros_like(a) if g is None else _weighted(g, weight, n)
                 for a, g in zip(acc, grads)]
        return [a + tf.cast(g, a.dtype) for a, g in zip(acc, grads)] + [
            acc[-1] + tf.cast(n, tf.float64)
        ]

    @tf.function(reduce_retracing=True)
    def step(inputs, acc, scale):
        return strategy.run(replica_step, args=(inputs, acc, scale))

    return connected, step


def _weight(objective: Any, replicas: float, count: Any) -> Any:
    """The factor that turns this replica's gradient into its share of n_b * gradient.

    Applied after differentiation, so float16 gradients are no larger than in `fit`.
    """
    if objective.kind == "target":
        return tf.constant(1.0)
    if objective.kind == "compiled":  # Keras divided the whole objective by R
        return replicas * count
    return count  # loss=: its objective is rebuilt at the global scale (see the gradients)


def _weighted(grad: Any, weight: Any, n: Any) -> Any:
    """Weight (and unscale) a gradient; an empty shard adds zeros, never an empty mean's NaN."""
    grad = tf.convert_to_tensor(grad)
    return tf.where(n > 0, grad * tf.cast(weight, grad.dtype), tf.zeros_like(grad))
