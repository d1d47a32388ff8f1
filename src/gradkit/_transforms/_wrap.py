"""`wrap(optimizer, transform)`: an optimizer whose compiled step runs a transform first.

The transform runs inside the train step `fit` compiles, through the optimizer hook of
`gradkit._backends._step_hook`, on the framework's tensors (`gradkit._transforms._ops`): on
the TRUE-scale gradients (a LossScaleOptimizer's scale divided out), summed over the replicas
of a TensorFlow strategy, the averaged gradient under ``gradient_accumulation_steps``, and
before the optimizer's own ``clipnorm`` / ``global_clipnorm`` / ``clipvalue``.
"""

from __future__ import annotations

from typing import Any

from gradkit._backends import _step_hook
from gradkit._errors import InvalidArgumentError, received
from gradkit._select import unique_keys
from gradkit._transforms._base import GradientTransformation, host_only
from gradkit._transforms._ops import KerasOps, TensorFlowOps, in_step


def wrap(optimizer: Any, transform: GradientTransformation) -> Any:
    """A NEW optimizer, configured as `optimizer`, whose every update first applies
    `transform` to the gradients, inside the step ``fit`` compiles::

        model.compile(optimizer=T.wrap(keras.optimizers.Adam(1e-3),
                                       T.chain(T.clip_by_global_norm(1.0),
                                               T.scale_by_layer({"embedding": 0.1}))),
                      loss=...)

    The transform sees what ``gradkit.gradients(model, x, y, training=True)`` gives for the
    step's batch: true scale (mixed-precision loss scaling undone), summed over the replicas
    of a distribution strategy, keyed by variable path; under ``gradient_accumulation_steps``
    the averaged gradient of each applied update. It runs before the optimizer's own
    clipping, weight decay and update, so one epoch of ``fit`` equals a manual loop of
    ``gradients -> transform.update -> gradkit.apply``. Inside the step a transform keeps no
    state between updates: ``apply_if_finite`` zeroes a non-finite update but keeps no
    counts, and ``add_noise`` is refused (use a manual loop or ``clipped_gradients``).

    `optimizer` itself is not changed: the new one is built from its config, with fresh
    state (pass it to ``compile`` before training). Keras 3 or tf-keras optimizers. A saved
    model holds no Python code: it loads with the plain optimizer; wrap it again.
    """
    if not isinstance(transform, GradientTransformation):
        raise InvalidArgumentError(
            "wrap(optimizer, transform) takes a gradient transformation as its second "
            "argument, e.g. gradkit.transforms.clip_by_global_norm(1.0). "
            + received(transform=transform))
    if host_only(transform):
        raise InvalidArgumentError(
            "This transform holds add_noise, which runs on NumPy gradient sets only (its "
            "generator state lives on the host), not inside fit's compiled step. Add noise in "
            "a manual loop (gradients -> transform -> gradkit.apply), or use "
            "gradkit.clipped_gradients(noise_multiplier=...) for DP-SGD. "
            + received(transform=type(transform).__name__))
    fresh = _copy(optimizer)
    ops = KerasOps() if _step_hook.kind(_step_hook.target(fresh)) == "keras3" else TensorFlowOps()

    def transformed(grads: list, variables: list, step: Any) -> list:
        keys = unique_keys(variables)
        with in_step(ops):
            tensors = dict(zip(keys, (_dense(g) for g in grads)))
            new, _ = transform.update(tensors, transform.init(tensors))
        return [new[key] for key in keys]

    _step_hook.install(fresh, transformed, stage="before_clip")
    return fresh


def _dense(grad: Any) -> Any:
    """TensorFlow's gradient of a gather (an Embedding's): IndexedSlices, one row per id
    looked up, an id looked up twice in two rows that add up. The transforms act on the
    gradient those rows stand for (a norm or a clip of two rows is not that of their sum)."""
    if type(grad).__name__ != "IndexedSlices":
        return grad
    import tensorflow as tf

    return tf.convert_to_tensor(grad)


def _copy(optimizer: Any) -> Any:
    """A new optimizer of `optimizer`'s class and config (Keras 3 or tf-keras)."""
    if not _is_optimizer(optimizer):
        raise InvalidArgumentError(
            "wrap() takes a Keras optimizer object such as keras.optimizers.Adam(1e-3) "
            "(tf_keras.optimizers.Adam for tf-keras), not a name or another object. "
            + received(optimizer=optimizer))
    return type(optimizer).from_config(optimizer.get_config())


def _is_optimizer(optimizer: Any) -> bool:
    names = {cls.__name__ for cls in type(optimizer).__mro__}
    return bool(names & {"BaseOptimizer", "OptimizerV2", "Optimizer"}) and hasattr(
        optimizer, "get_config")
