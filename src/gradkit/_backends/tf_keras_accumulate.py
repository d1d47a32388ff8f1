"""Streaming accumulation on tf-keras (gradkit.accumulate): the Keras 3 TensorFlow
accumulator (`tensorflow_accumulate.accumulator_over`) over tf-keras' state-restoring
cached gradient step."""

from __future__ import annotations

import weakref
from typing import Any

from gradkit._backends import _cache
from gradkit._backends.tensorflow_accumulate import accumulator_over
from gradkit._backends.tf_keras import _CACHE, _build, _check_ready, _loss_scale
from gradkit._objective import Objective

_ACCUMULATE: "weakref.WeakKeyDictionary[Any, _cache.BoundedCache]" = weakref.WeakKeyDictionary()


def gradient_accumulator(model, variables, objective: Objective, training: bool,
                         skip_nonfinite: bool):
    """A running sum Σ_b w_b ∇L_b kept on the device (see gradkit._accumulate); needs eager
    execution and a built model."""
    _check_ready(model)
    return accumulator_over(model, variables, objective, training, skip_nonfinite,
                            _loss_scale(model), _CACHE, _build, _ACCUMULATE)
