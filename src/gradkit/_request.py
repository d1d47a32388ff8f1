"""One prepared call: the front door checks its arguments once and hands a `Request` on.

`prepare()` resolves the model's flavour and adapter, the selected variables, the objective and
the checked batch; every public function starts with it, so a bad argument gets the same clear
error everywhere. `finish()` names an adapter's arrays and applies the result-dtype rule
(`result_dtype`, the one place it is written) and the `unconnected=` rule.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradkit import _backends
from gradkit._data import Batch, leaves, prepare_batch
from gradkit._detect import flavour_of
from gradkit._errors import (
    DataShapeError,
    InvalidArgumentError,
    NonFiniteGradientWarning,
    UnconnectedGradientError,
    UnsupportedModelError,
    received,
)
from gradkit._labels import check_labels
from gradkit._objective import Objective, resolve_objective
from gradkit._seeds import resolve_seed
from gradkit._sources import check_one_batch
from gradkit._select import layer_of, select_variables, unique_keys

UNCONNECTED_MODES = ("raise", "zero", "none")


@dataclass(frozen=True, eq=False)
class Request:
    """What one call differentiates: `variables` (selected, in model order), `objective`,
    `batch` (None for dataset-wide calls) and `training`, on `model` through `adapter`."""

    model: Any
    flavour: str
    adapter: Any  # a gradkit._backends.Adapter
    variables: list
    objective: Objective
    batch: Batch | None
    training: bool
    seed: int | None = None  # dropout seed of training=True (gradkit._seeds), None otherwise
    layers: Any = None  # the `layers=` argument as the caller gave it (for messages)
    #: what the chunks of one call share, computed by the first that needs it (the
    #: regularizers' gradients at the call's weights); `replace` passes on the same dict
    per_call: dict = dataclasses.field(default_factory=dict, repr=False)

    @functools.cached_property
    def keys(self) -> list[str]:
        return unique_keys(self.variables)

    @functools.cached_property
    def dtypes(self) -> list[np.dtype]:
        """`result_dtype` of each selected variable."""
        return [result_dtype(v) for v in self.variables]

    def cache_key(self) -> tuple:
        """Identifies the variables, objective and mode for the adapter's compiled caches."""
        return (tuple(id(v) for v in self.variables), self.objective.cache_key(),
                self.training)

    def replace(self, **changes: Any) -> Request:
        """A copy with some fields changed (e.g. ``batch=`` one chunk)."""
        return dataclasses.replace(self, **changes)


def prepare(model: Any, x: Any = None, y: Any = None, *, loss: Any = None, target: Any = None,
            sample_weight: Any = None, layers: Any = None, training: bool = False,
            unconnected: str = "raise", data: bool = True, seed: Any = None,
            scores: bool = True, rows: bool = False) -> Request:
    """Check every argument and build the Request (`data=False`: no batch, for datasets;
    `y` is then the first batch's, to check the objective; `scores`: whether the caller
    takes ``target=``; `rows`: whether its result is a row per example, so that a batch of
    none gives empty rows, where every other call refuses it)."""
    flavour = flavour_of(model)
    check_built(model)
    if unconnected not in UNCONNECTED_MODES:
        raise InvalidArgumentError(
            f"unconnected= must be one of {UNCONNECTED_MODES}. " + received(unconnected=unconnected)
        )
    if not isinstance(training, (bool, np.bool_)):
        raise InvalidArgumentError(
            "training= must be True or False. " + received(training=training)
        )
    seed = resolve_seed(seed, bool(training))
    if data:  # before the objective, which would ask for the y the source holds
        check_one_batch(x)
    objective = resolve_objective(model, loss, target, y, scores)
    variables = select_variables(model, layers)
    batch = prepare_batch(model, x, y, sample_weight, floatx(flavour)) if data else None
    if data and batch.size == 0 and not rows:
        raise DataShapeError(
            "x holds no examples (a batch of size 0), so there is nothing to differentiate "
            "(the mean loss of no examples is undefined). Pass at least one example. "
            + received(batch_size=0)
        )
    check_labels(model, objective, batch.y if data else y)
    return Request(model, flavour, _backends.for_flavour(flavour), variables, objective, batch,
                   bool(training), seed, layers)


def check_built(model: Any) -> None:
    """Raise if the model has no weights yet (a Sequential without Input, never called)."""
    if not getattr(model, "built", True) or not getattr(model, "variables", True):
        raise UnsupportedModelError(
            f"Model {model.name!r} has not been built, so it has no weights to differentiate. "
            "Build it first: call it once on a batch (model(x[:1])) or call model.build(...). "
            + received(built=getattr(model, "built", None))
        )


def floatx(flavour: str) -> str:
    """The Keras float type of `flavour` (NumPy data is cast to it, as `fit` does)."""
    if flavour == "tf_keras":
        import tf_keras

        return tf_keras.backend.floatx()
    import keras

    return keras.config.floatx()


def result_dtype(value: Any) -> np.dtype:
    """The dtype of every result computed for `value` (a variable, input, array, tensor or
    dtype): float64 for float64, float32 for all others (float16 and bfloat16 results are
    widened, never rounded)."""
    dtype = getattr(value, "dtype", value)
    name = str(getattr(dtype, "name", dtype)).rsplit(".", 1)[-1]  # torch.float64 -> float64
    return np.dtype("float64") if name == "float64" else np.dtype("float32")


def finish(request: Request, grads: list, unconnected: str = "raise") -> dict[str, Any]:
    """Name the adapter's arrays, apply the `unconnected` rule and report NaN/Inf."""
    variables, keys = request.variables, request.keys
    check_connected(keys, [g is not None for g in grads], unconnected)
    result: dict[str, Any] = {}
    for key, variable, grad in zip(keys, variables, grads):
        dtype = result_dtype(variable)
        if grad is None:
            result[key] = np.zeros(tuple(variable.shape), dtype) if unconnected == "zero" else None
        else:
            result[key] = np.asarray(grad, dtype=dtype).reshape(tuple(variable.shape))
    report_nonfinite(result, request.batch)
    return result


#: `check_connected`'s default: the caller takes ``unconnected=``
OPTION = object()


def check_connected(keys: list[str], connected: list[bool], unconnected: str = "raise",
                    what: str = "gradient", *, layers: Any = OPTION) -> None:
    """Raise UnconnectedGradientError naming the variables with no path to the objective.

    A caller without an ``unconnected=`` option passes the `layers=` it was given: the
    message then names the layers that do reach the objective instead."""
    missing = [k for k, ok in zip(keys, connected) if not ok]
    if not missing or unconnected != "raise":
        return
    if layers is OPTION:
        fix = ("Select other layers with layers=, or pass unconnected='zero' (zeros) or "
               "unconnected='none' (None) to accept it. " + received(unconnected=unconnected))
    else:
        reaching = list(dict.fromkeys(layer_of(k) for k, ok in zip(keys, connected) if ok))
        fix = (f"Leave them out with layers= (here layers={reaching} reach it). "
               if reaching else "Check the loss or target: nothing selected reaches it. ")
        fix += received(layers=layers)
    raise UnconnectedGradientError(
        f"{len(missing)} selected variable(s) do not affect the loss, so their {what} "
        f"is undefined: {', '.join(missing)}. " + fix
    )


def report_nonfinite(result: dict[str, Any], batch: Batch | None = None) -> None:
    """Warn, naming the variables, if any gradient holds NaN or Inf."""
    bad = [k for k, g in result.items() if g is not None and not np.all(np.isfinite(g))]
    if not bad:
        return
    cause = ""
    if batch is not None:
        arrays = [a for a in leaves(batch.x) + leaves(batch.y) if isinstance(a, np.ndarray)]
        count = sum(int(np.sum(~np.isfinite(a))) for a in arrays if a.dtype.kind == "f")
        if count:
            cause = f" The data itself holds {count} NaN/Inf value(s)."
    warnings.warn(
        f"Non-finite gradient (NaN or Inf) in {len(bad)} variable(s): {', '.join(bad[:10])}"
        f"{' ...' if len(bad) > 10 else ''}.{cause} Check the data for NaN/Inf, the loss "
        "for log(0) or division by zero, and the learning rate for divergence.",
        NonFiniteGradientWarning,
        stacklevel=3,
    )
