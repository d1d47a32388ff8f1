"""Which flavour of Keras a model belongs to, without importing any framework.

Flavours: ``"tensorflow"``, ``"jax"``, ``"torch"`` (Keras 3 on that backend) and
``"tf_keras"`` (legacy Keras 2, the ``tf_keras`` package or ``tf.keras`` on TF < 2.16).
"""

from __future__ import annotations

import sys

from gradkit._errors import UnsupportedModelError, received

FLAVOURS = ("tensorflow", "jax", "torch", "tf_keras")


def flavour_of(model: object) -> str:
    """Return the flavour of `model`, or raise UnsupportedModelError."""
    modules = [getattr(cls, "__module__", "") or "" for cls in type(model).__mro__]
    if any(m.startswith("keras.src.models") for m in modules):
        return _keras3_backend()
    if any(m.startswith(("tf_keras.", "keras.src.engine", "keras.engine"))
           and m.endswith(".engine.training") for m in modules):  # Model, not just a Layer
        return "tf_keras"
    raise UnsupportedModelError(
        "gradkit differentiates Keras models (keras.Model, keras.Sequential or a subclass, "
        "Keras 3 or tf-keras), but the object given is not one. Pass the Keras model itself, "
        "not a layer, a function or a saved file path (load it with keras.saving.load_model). "
        + received(model=type(model).__qualname__)
    )


def _keras3_backend() -> str:
    keras = sys.modules["keras"]  # a Keras 3 model exists, so keras is imported
    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax", "torch"):
        raise UnsupportedModelError(
            "gradkit supports Keras 3 on the tensorflow, jax and torch backends. "
            "Set KERAS_BACKEND to one of them before importing keras. "
            + received(backend=backend)
        )
    return backend
