"""Dataset gradients over several devices or machines, through each framework's own engine.

`accumulate_distributed` is what ``gradkit.accumulate(..., strategy=...)`` calls. What
``strategy=`` takes depends on the flavour:

- TensorFlow (Keras 3 on TF, and tf-keras): a ``tf.distribute.MirroredStrategy``,
  ``MultiWorkerMirroredStrategy`` or ``OneDeviceStrategy`` whose ``scope()`` the model was
  built in. Each batch is split over the local replicas, each replica sums the weighted
  gradients of its shard, and one batched all-reduce (SUM) after the last batch adds
  them up. Keras' division of a mean loss by the replica count is undone exactly.
- JAX: ``"data_parallel"`` (every device, ``jax.devices()``), a
  ``keras.distribution.DataParallel`` or a ``jax.sharding.Mesh``. The batch axis is sharded
  over the devices (``NamedSharding``), the weights replicated, and the one jitted gradient
  program runs on the global batch, XLA inserting the all-reduce. After
  ``jax.distributed.initialize`` the mesh spans every process.
- torch: no strategy (raises).

Multi-worker / multi-process: each worker passes its OWN share of the data (e.g.
``dataset.shard(num_workers, index)``); the result, identical on every worker, covers the
union of all shares. TensorFlow workers may hold different numbers of batches and
examples; JAX processes must yield the same number of batches (a process that runs out
first makes every process raise), whose sizes may differ.

Exactness: the objective must be a mean over examples (reduction ``"sum_over_batch_size"``,
the default, or ``"mean"``) or a ``target=`` score, so that a batch's gradient splits over
shards; other reductions raise. The result equals the single-device one up to float
rounding. One exception, as in ``fit``: layers that use batch statistics under
``training=True`` (BatchNorm) see each replica's shard on TensorFlow; on JAX they see the
whole batch when its size is a multiple of the device count, else its divisible part and
the few remaining examples separately.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from gradkit._data import Batch
from gradkit._objective import check_mean_reduction
from gradkit._request import Request


def accumulate_distributed(request: Request, batches: Iterable[Batch],
                           strategy: Any) -> tuple[list[np.ndarray | None], int]:
    """Sum over all batches of every worker of ``n_b * gradient(batch b's objective)``, and N.

    With a mean-reduced objective (compiled loss or ``loss=``; sample weights, loss weights
    and ``model.losses`` included) dividing the sum by N gives the exact gradient of the
    mean loss over the dataset. With ``target=`` the first element is the plain sum of the
    batch gradients, i.e. of the scores over every example (no n_b factor). Gradients are
    unscaled (mixed-precision loss scale undone), one array per selected variable, None for
    a variable not connected to the objective. N is the total example count over every
    worker. No model state changes.
    """
    check_mean_reduction(request.model, request.objective, "strategy=")
    return request.adapter.distributed_sum(request, batches, strategy)
