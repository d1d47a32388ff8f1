"""The copy a gradient check runs on, so the user's model is never touched.

``model_copy(model, flavour, "float64")`` clones the model (``clone_model`` of Keras 3, recursing
into nested models, or of tf-keras) with every floating-point layer's dtype policy replaced by
float64 (mixed-precision policies too; integer layers keep theirs), copies every weight into it
(float weights widened to float64) and compiles it with the model's own losses and loss weights.
``dtype=None`` clones with the layers' own dtypes (the float32 fallback). Where no faithful
clone can be made (a subclassed model or custom layer without a usable ``get_config``) it
raises `NoCopy`, and the check runs on the model itself.

`float64_scope` is what makes float64 real while the check runs: Keras' floatx is float64 (so
losses, the compiled-loss container and data are float64 too; global, restored after: do not
run Keras in another thread meanwhile) and, on JAX, 64-bit types are enabled for this thread
(``jax.enable_x64``). Even so, Keras 3 rounds some float64 ops to float32 on JAX and torch
(its ``result_type`` maps float64 to float32 there), which is why the check measures the
copy's rounding noise instead of trusting dtypes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np


class NoCopy(Exception):
    """`model_copy` could not make a faithful copy; the message says why."""


@contextlib.contextmanager
def float64_scope(flavour: str) -> Iterator[None]:
    """floatx float64 (and JAX 64-bit types) for the duration of the block."""
    backend = _keras(flavour).backend
    before = backend.floatx()
    with contextlib.ExitStack() as stack:
        if flavour == "jax":
            stack.enter_context(_jax_x64())
        backend.set_floatx("float64")
        try:
            yield
        finally:
            backend.set_floatx(before)


def _jax_x64() -> Any:
    import jax

    enable = getattr(jax, "enable_x64", None)
    if enable is None:  # JAX before 0.4.36
        from jax.experimental import enable_x64 as enable
    return enable(True)


def _keras(flavour: str) -> Any:
    if flavour == "tf_keras":
        import tf_keras

        return tf_keras
    import keras

    return keras


def model_copy(model: Any, flavour: str, dtype: str | None) -> Any:
    """A compiled clone of `model` with its weights (see the module docstring)."""
    keras = _keras(flavour)

    def clone_layer(layer: Any) -> Any:
        config = with_dtype(layer.get_config(), dtype)
        return layer.__class__.from_config(config)

    options = {} if flavour == "tf_keras" else {"recursive": True}
    try:
        copy = keras.models.clone_model(model, clone_function=clone_layer, **options)
    except Exception as exc:  # clone_model raises ValueError, TypeError, NotImplementedError...
        raise NoCopy(f"keras.models.clone_model could not copy {model.name!r}: "
                     f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    _copy_weights(model, copy)
    if flavour == "tf_keras" and getattr(model, "_is_compiled", False):
        args = model._get_compile_args(user_metrics=False)
        copy.compile(optimizer="sgd", loss=args.get("loss"),
                     loss_weights=args.get("loss_weights"))
    return copy


def with_dtype(config: Any, dtype: str | None) -> Any:
    """`config` with every floating-point ``"dtype"`` entry (nested ones too) set to `dtype`
    (None: kept), and every initializer "zeros": the weights are copied in anyway, and random
    initializers cost JAX a compilation per new shape and dtype."""
    if isinstance(config, dict):
        return {key: dtype if key == "dtype" and dtype and _is_float_policy(value)
                else "zeros" if key.endswith("initializer") and value is not None
                else with_dtype(value, dtype) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        values = [with_dtype(value, dtype) for value in config]
        return tuple(values) if isinstance(config, tuple) else values
    return config


def _is_float_policy(value: Any) -> bool:
    if isinstance(value, dict):  # a serialized DTypePolicy / tf-keras Policy
        value = (value.get("config") or {}).get("name")
    name = str(getattr(value, "name", value))
    return "float" in name and "float8" not in name


def _copy_weights(model: Any, copy: Any) -> None:
    pairs = list(zip(model.weights, copy.weights))
    if len(model.weights) != len(copy.weights) or any(
            tuple(a.shape) != tuple(b.shape) for a, b in pairs):
        raise NoCopy(f"the clone of {model.name!r} does not have the model's weights "
                     f"({len(copy.weights)} instead of {len(model.weights)}, or other shapes: "
                     "a custom layer's get_config() does not rebuild it exactly)")
    for original, clone in pairs:
        value = np.array(original.numpy())  # a copy: the model's own buffer is never shared
        if value.dtype.kind == "f" and "float64" in str(clone.dtype):
            value = value.astype(np.float64)
        clone.assign(value)


def fresh_loss(spec: Any, flavour: str) -> Any:
    """A Keras 3 Loss rebuilt from its config (under `float64_scope`: in float64, since a
    Loss computes in the floatx of its construction); anything else as given."""
    if flavour == "tf_keras" or spec is None:
        return spec
    keras = _keras(flavour)
    if isinstance(spec, keras.losses.Loss):
        with contextlib.suppress(Exception):  # a custom Loss without a usable config
            return type(spec).from_config(spec.get_config())
    return spec
