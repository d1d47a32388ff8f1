"""`check_gradients()`: gradkit's gradients (the framework's autodiff) against finite
differences of the same objective, on a float64 copy of the model.

The package: `_copy` (the float64 copy and the scope that makes float64 real), `_report`
(verdicts and the report). Here: the directions, the rounding-noise probe, the differences.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable

import numpy as np

from gradkit._check._copy import NoCopy, float64_scope, fresh_loss, model_copy
from gradkit._check._report import (
    FLOOR,
    RTOL,
    STEPS,
    GradientCheck,
    VariableCheck,
    judge,
)
from gradkit._errors import GradkitError, InvalidArgumentError, original_errors, received
from gradkit._gradients import loss_and_gradients_of
from gradkit._request import prepare
from gradkit._seeds import check_seed

__all__ = ["GradientCheck", "VariableCheck", "check_gradients"]

#: Relative rounding noise of the objective above which the copy counts as float32 (float32
#: ops give 1e-9 to 1e-7; float64 with ReLU kinks in the probe's reach about 1e-13).
FLOAT64_NOISE = 1e-10


def check_gradients(model: Any, x: Any, y: Any = None, *, loss: Any = None, target: Any = None,
                    layers: Any = None, directions: int = 3,
                    seed: int | None = None) -> GradientCheck:
    """Check gradkit's gradients against central finite differences, per variable.

    The objective is the one ``gradients()`` differentiates with the same ``loss=``,
    ``target=`` and ``layers=`` (compiled loss by default: mean over the batch, regularizers
    included), in inference mode (dropout off, BatchNorm moving statistics). Each selected
    variable is probed along ``directions`` random unit directions (from ``seed``): the
    autodiff derivative ⟨∇L, d⟩ against central differences at two steps, so that a wrong
    gradient ("mismatch") is told apart from a function that is not smooth at this point
    ("not smooth": a ReLU kink, a max-pooling tie; inconclusive, not a failure).

    Everything runs on a float64 copy of the model (``clone_model``; float layers set to
    float64, weights copied): the model itself, its weights, dtype policies and state are
    never touched, but while the check runs Keras' floatx is float64 (restored after). Where
    the copy cannot compute in float64 (an op that rounds to float32, e.g. some Keras 3 ops
    on JAX and torch, measured as rounding noise), the check warns and uses float32 step sizes
    and a wider tolerance; ``report.precision`` says which. A model ``clone_model`` cannot
    copy (a subclassed model without ``get_config``) is checked on itself in its own dtype,
    with float32 steps and tolerance (warned): its selected weights are set to the probes'
    points and restored bitwise after, whatever happens (do not use the model in another
    thread meanwhile).

    Returns a `GradientCheck`: ``.ok`` (no mismatch), ``.variables`` (per variable key: the
    directional derivatives, relative error, verdict); ``print(report)`` shows a table.
    Costs 1 gradient and about ``4 * directions`` objective evaluations per variable.
    """
    check_seed(seed, "directions")
    request = prepare(model, x, y, loss=loss, target=target, layers=layers)
    if isinstance(directions, (bool, np.bool_)) or not isinstance(
            directions, (int, np.integer)) or directions < 1:
        raise InvalidArgumentError(
            "directions= must be an int of at least 1: the random directions per variable. "
            + received(directions=directions))
    position = {id(v): i for i, v in enumerate(model.trainable_variables)}
    plan = _Plan(request.flavour, x, y, loss, target,
                 [position[id(v)] for v in request.variables], request.keys,
                 _unit_directions(request.variables, int(directions), seed))
    try:
        with float64_scope(request.flavour):
            return plan.run(model, "float64")
    except _Float64Failed as failed:
        note = (f"the float64 copy failed ({failed}); checked in the model's own dtype, "
                "with float32 steps and tolerance")
        in_place = False
    except NoCopy as failed:  # no faithful copy can be made: the model itself
        note = (f"{failed}; checked on the model itself in its own dtype, with float32 "
                "steps and tolerance, its weights restored bitwise after")
        in_place = True
    warnings.warn("check_gradients: " + note, RuntimeWarning, stacklevel=2)
    return plan.run(model, None, note, in_place)


class _Float64Failed(Exception):
    """The float64 copy raised where the model's own dtype may not."""


def _unit_directions(variables: list, count: int, seed: Any) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for variable in variables:
        shape = tuple(variable.shape)
        draws = [rng.standard_normal(shape) for _ in range(count)]
        out.append([d / max(np.linalg.norm(d), 1e-300) for d in draws])
    return out


class _Plan:
    """One check: the arguments, and the work on a copy of a given dtype."""

    def __init__(self, flavour, x, y, loss, target, positions, keys, directions):
        self.flavour, self.x, self.y, self.loss, self.target = flavour, x, y, loss, target
        self.positions, self.keys, self.directions = positions, keys, directions

    def run(self, model: Any, dtype: str | None, note: str = "",
            in_place: bool = False) -> GradientCheck:
        """The check on a copy in `dtype` (None: the model's own dtypes), or, `in_place`,
        on the model itself (its chosen weights restored bitwise after)."""
        copy = model if in_place else model_copy(model, self.flavour, dtype)
        request = prepare(copy, self.x, self.y, loss=fresh_loss(self.loss, self.flavour),
                          target=self.target)
        chosen = [copy.trainable_variables[i] for i in self.positions]
        request = request.replace(variables=chosen)
        try:
            _, grads = loss_and_gradients_of(request, "zero")
        except GradkitError:
            raise
        except Exception as exc:
            if dtype is None:
                raise
            raise _Float64Failed(_short(exc)) from None
        value_request = request.replace(variables=[])

        def value() -> float:
            with original_errors():
                return request.adapter.gradients(value_request)[0]

        origins = [np.array(v.numpy()) for v in chosen]
        try:
            return self._judged(chosen, origins, grads, value, dtype, note)
        finally:  # the probes' points never outlive the check (on the model itself above all)
            for variable, origin in zip(chosen, origins):
                _assign(variable, origin, origin)

    def _judged(self, chosen, origins, grads, value, dtype, note) -> GradientCheck:
        noise, base, quantized = rounding_noise(chosen, origins, value)
        precision = "float64" if dtype and not quantized and noise <= FLOAT64_NOISE * base \
            else "float32"
        if dtype and precision == "float32":
            note = (f"the float64 copy rounds like float32 (relative noise {noise / base:.1e}"
                    f"{', values on a float32 grid' if quantized else ''}): "
                    "an op inside computes in float32 (Keras 3 on JAX and torch rounds some "
                    "float64 ops to float32); float32 steps and tolerance used")
            warnings.warn("check_gradients: " + note, RuntimeWarning, stacklevel=4)
        steps, rtol = STEPS[precision], RTOL[precision]
        numbers = [_differences(variable, origin, grad, dirs, value, steps)
                   for variable, origin, grad, dirs in zip(chosen, origins, grads.values(),
                                                           self.directions)]
        floor = FLOOR[precision] * max([np.linalg.norm(n[0]) for n in numbers] + [0.0])
        results = {key: judge(*n, noise=4 * noise / (steps[1] * size), rtol=rtol,
                              ratio=steps[1] / steps[0], floor=floor)
                   for key, (*n, size) in zip(self.keys, numbers)}
        return GradientCheck(results, precision, steps, rtol, note)


def _short(exc: Exception) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(exc).split()))
    return f"{type(exc).__name__}: {text[:200]}"


def _assign(variable: Any, array: np.ndarray, like: np.ndarray) -> None:
    variable.assign(np.asarray(array, dtype=like.dtype))


def rounding_noise(variables: list, origins: list, value: Callable) -> tuple:
    """(σ, reference, quantized): the standard deviation of the objective's rounding noise,
    from the residuals of a cubic fit to 7 values along a tiny step (1e-7 of the weights'
    norm) in a fixed random direction; the objective's magnitude; whether the values sit on
    a float32 grid (all exactly float32, or fewer than 4 distinct: a float32 loss, or a
    float32 op inside that the tiny step does not move)."""
    rng = np.random.default_rng(0)
    direction = [rng.standard_normal(o.shape) for o in origins]
    size = max(np.sqrt(sum(float(np.sum(np.square(o, dtype=np.float64))) for o in origins)), 1.0)
    step = 1e-7 * size / np.sqrt(sum(float(np.sum(d * d)) for d in direction))
    values = []
    for k in range(-3, 4):
        for variable, origin, d in zip(variables, origins, direction):
            _assign(variable, origin + k * step * d, origin)
        values.append(value())
    for variable, origin in zip(variables, origins):
        _assign(variable, origin, origin)
    raw = np.array(values, np.float64)
    quantized = bool(np.all(raw.astype(np.float32) == raw) or len(set(raw.tolist())) < 4)
    shifted = raw - raw[3]
    ks = np.arange(-3.0, 4.0)
    residual = shifted - np.polyval(np.polyfit(ks, shifted, 3), ks)
    sigma = float(np.sqrt(np.sum(residual ** 2) / 3))
    return sigma, max(float(np.max(np.abs(raw))), 1e-300), quantized


def _differences(variable, origin, grad, directions, value, steps) -> tuple:
    """(autodiff, central at both steps, one-sided at both steps, size) along each direction;
    the steps are relative to size = max(‖w‖, 1)."""
    size = max(float(np.linalg.norm(origin)), 1.0)
    base = value()
    central, curvature = [], []
    for relative in steps:
        h = relative * size
        cs, ss = [], []
        for d in directions:
            _assign(variable, origin + h * d, origin)
            plus = value()
            _assign(variable, origin - h * d, origin)
            minus = value()
            cs.append((plus - minus) / (2 * h))
            ss.append((plus - 2 * base + minus) / h)
        central.append(cs)
        curvature.append(ss)
    _assign(variable, origin, origin)
    grad = np.asarray(grad, np.float64)
    autodiff = [float(np.sum(grad * d)) for d in directions]
    return autodiff, central[0], central[1], curvature[0], curvature[1], size
