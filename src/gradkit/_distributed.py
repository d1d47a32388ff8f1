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
- torch: ``"torch.distributed"`` (the default process group) or a torch.distributed process
  group, after ``torch.distributed.init_process_group`` in every process (gloo on CPU). Each
  process sums its own share locally, and one all-reduce (SUM) of the partial sums and
  example counts gives the union's (`gradkit._backends.torch_distributed`). The call is
  COLLECTIVE: every process must make it, with the same model and options; a failure or a
  mismatch on any process raises on all of them. `process_group` is how ``accumulate`` and
  the dataset curvature functions (``hvp_over``, ``hessian_trace``, ``hessian_eigenvalues``,
  ``fisher_diagonal``) reach it.

Multi-worker / multi-process: each worker passes its OWN share of the data (e.g.
``dataset.shard(num_workers, index)``); the result, identical on every worker, covers the
union of all shares. TensorFlow workers may hold different numbers of batches and
examples; JAX processes must yield the same number of batches (a process that runs out
first makes every process raise), whose sizes may differ; torch processes may hold any
number of batches and examples, but at least one example each.

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
from gradkit._detect import flavour_of
from gradkit._errors import InvalidArgumentError, received
from gradkit._objective import check_mean_reduction
from gradkit._request import Request

TORCH_STRATEGY = "torch.distributed"


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


def process_group(model: Any, strategy: Any, needed_by: str, others: bool = True) -> Any:
    """The torch.distributed group that `strategy` names for a torch model (a
    `gradkit._backends.torch_distributed.ProcessGroup`), or None: no strategy, or (with
    `others`) a TensorFlow or JAX strategy, left to `accumulate_distributed`."""
    if strategy is None:
        return None
    flavour = flavour_of(model)
    if flavour == "torch":
        from gradkit._backends import torch_distributed

        return torch_distributed.ProcessGroup(strategy)
    torch_like = (isinstance(strategy, str) and strategy == TORCH_STRATEGY) or \
        type(strategy).__module__.split(".")[0] == "torch"
    if torch_like or not others:
        supported = ("strategy='torch.distributed' (or a torch.distributed process group) "
                     "works on Keras 3 with the torch backend only")
        if others:
            supported += ("; on TensorFlow pass a tf.distribute strategy, on JAX "
                          "'data_parallel' or a jax.sharding.Mesh")
        raise InvalidArgumentError(
            f"{needed_by}: {supported}. Use strategy=None on the {flavour} flavour, or "
            "run the model with KERAS_BACKEND=torch. "
            + received(strategy=strategy, flavour=flavour))
    return None
