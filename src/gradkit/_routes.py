"""How per-example work runs for one model and selection: chosen once, remembered.

Three routes give the same rows: "vectorized", the adapter's ``per_example_parts`` (factors
and the framework's vectorizer inside one compiled function; where every selected variable
has factors and the model runs in inference, one forward and one backward pass over the
whole batch instead, gradkit._backends._batched); "mapped", its ``mapped_parts``
(the same function with a loop over the chunk's examples compiled into it: ``tf.map_fn``,
``jax.lax.map``; on torch, eager, a Python loop inside one call); and "loop", the adapter's compiled, cached single-example
gradient called once per example. Per model, variables, objective and training mode (one
`Route` in the model's cache of compiled functions) gradkit remembers:

- a hazard: the framework's vectorizer is known to crash the process or return wrong rows on
  an op the model uses (``adapter.vectorize_hazard``: TensorFlow's pfor over Einsum kernels
  under oneDNN), or to be slow (per-example depthwise convolutions). The vectorized route is
  never taken;
- a failure: a route raised once (a converter gap, e.g. TensorFlow's pfor through the while
  loops of recurrent layers), or its first chunk's rows disagreed with the framework's own
  gradient of that chunk's first example (`disagreement`: a layer the backend computes
  otherwise than the formula its factors follow). It is never retried;
- a timing, per operation (rows, norms, clipped): the routes still open take turns, in the
  order above: each runs one untimed chunk that compiles it, then up to `TIMINGS` timed
  chunks of an already compiled size; after k of them, a route over ``KEEP[k - 1]`` times
  the best route timed so far is timed no more (one far behind is dropped after one timing,
  close contenders are timed until the first calls' costs and load spikes have passed);
  the fastest by its best time is kept, except that a route within `TIE` of it and
  earlier in `ROUTES` wins the tie: the timed chunks run back to back, where the compiled
  loop keeps up with one program over the batch, but between other work (caches gone cold)
  the one program holds its speed better (JAX transformer of benchmarks/bench_zoo.py: 0.31
  against 0.36 of the user's loop, after timing within 10 % of each other). Every chunk
  computed meanwhile is a real result.

A hazard or failure is logged once per Route on the ``"gradkit"`` logger, with its reason:
the framework's own first meaningful line, or the op.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Callable

import numpy as np

from gradkit._backends import _cache
from gradkit._data import slice_batch
from gradkit._errors import GradkitError, original_errors
from gradkit._factors import Factor, write_rows

logger = logging.getLogger("gradkit")
_NOISE = re.compile(r"^(in user code:|Traceback|File |Exception encountered when calling|"
                    r"Arguments received by|•|\^+$|~+$|During handling|The above exception|"
                    r"Graph execution error|Detected at node|\[\[|vectorizing failed:$)")
#: Timed chunks per route at most before the fastest is kept (the best of them counts)
TIMINGS = 4
#: After k timed chunks, a route this many times slower than the best so far is not timed
#: again (k = 1, 2, 3): lenient, as a process's first calls are slow (JAX MLP, one route's
#: chunks timed 1.22, 1.03, 0.90, 0.81 ms)
KEEP = (2.0, 1.5, 1.3)
#: Routes whose best times are within this factor of the fastest tie (see `_on_trial`)
TIE = 1.15
ROUTES = ("vectorized", "mapped", "loop")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Route:
    """What was learnt about one model and selection (see the module docstring)."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}  # route -> why it is not taken
        self.hazard_checked = False
        self.chosen: dict[str, str] = {}  # operation -> the route kept
        self.sizes: dict[tuple, set] = {}  # (operation, route) -> chunk sizes run (compiled)
        self.costs: dict[tuple, list] = {}  # (operation, route) -> seconds per example, timed
        self.agreed: set[str] = set()  # routes whose first rows agreed (`disagreement`)

    @property
    def reason(self) -> str | None:
        """Why the vectorized route is not taken (None: it may be)."""
        return self.reasons.get("vectorized")


def route_of(request: Any) -> Route:
    """The Route of `request`'s model and selection (created on first use)."""
    return _cache.cached(request.model, ("per_example_route", request.cache_key()), Route)


def run_chunk(request: Any, operation: str, store: Callable, start: int, stop: int,
              loop: Callable, check: Callable) -> None:
    """Compute the parts of the chunk `request` (examples ``start:stop`` of the call) on the
    route chosen for `operation` and hand them to ``store(start, stop, parts)``; `loop` is the
    loop route, `check(parts)` runs before anything is stored."""
    route = route_of(request)
    if not route.hazard_checked:
        route.hazard_checked = True
        if not request.adapter.maps_examples:
            route.reasons["mapped"] = "no compiled loop on this backend"
        hazard = request.adapter.vectorize_hazard(request)
        if hazard is not None:
            _give_up(route, request, "vectorized", hazard)
    if all(name in route.reasons for name in ROUTES[:-1]):
        route.chosen[operation] = "loop"  # nothing to compare it with
    runs = {"vectorized": request.adapter.per_example_parts,
            "mapped": request.adapter.mapped_parts, "loop": loop}
    name = route.chosen.get(operation) or _on_trial(route, operation)
    while True:
        compiled = stop - start in route.sizes.setdefault((operation, name), set())
        timed = compiled and operation not in route.chosen
        begin = time.perf_counter()
        try:
            with original_errors():
                parts = list(runs[name](request))
            reason = None if name == "loop" or name in route.agreed else \
                disagreement(request, parts, loop)
            if reason is None:
                route.agreed.add(name)
                break
        except Exception as error:  # noqa: BLE001 - any gap: the next route gives the rows
            if isinstance(error, GradkitError) or name == "loop":
                raise
            reason = first_line(error)
        _give_up(route, request, name, reason)
        route.chosen.pop(operation, None)
        name = _on_trial(route, operation)
    check(parts)
    store(start, stop, parts)  # timed too: on JAX this is where the host waits for the rows
    seconds = (time.perf_counter() - begin) / (stop - start)
    route.sizes[(operation, name)].add(stop - start)
    if timed:
        _timed(route, request, operation, name, seconds)


#: A route's first row of a variable agrees with the framework's own gradient of that example
#: when they differ by at most this fraction of its norm (plus `AGREE_FLOOR` of the example's
#: whole gradient): rounding and 16-bit compute stay far below, a formula that is not the
#: model's is far above (Keras 3 on TensorFlow adding a channels-first bias on the wrong axis:
#: about 1)
AGREE_RTOL = 0.05
AGREE_FLOOR = 1e-3


def disagreement(request: Any, parts: list, loop: Callable) -> str | None:
    """Why a route's `parts` for the chunk `request` are not the model's per-example
    gradients, or None: their first example's row of each variable against the framework's
    own gradient of that example (`loop` on it). Checked once per route of a model and
    selection: rows from factors follow each layer's documented formula, and a backend may
    compute something else for some shapes (Keras 3 on TensorFlow adds a channels-first
    convolution's bias along the last axis when that axis has as many entries as there are
    filters; on torch a LayerNormalization over axis 1 of a cube normalizes the last axis),
    which `fit` then differentiates."""
    expected = loop(request.replace(batch=slice_batch(request.batch, 0, 1)))
    rows = [None if part is None else _first_row(part, tuple(v.shape), dtype)
            for part, v, dtype in zip(parts, request.variables, request.dtypes)]
    wanted = [None if grads is None else np.asarray(grads[0], np.float64) for grads in expected]
    total = np.sqrt(sum(float(np.sum(g * g)) for g in wanted if g is not None))
    for key, row, grad in zip(request.keys, rows, wanted):
        if (row is None) != (grad is None):
            return f"{key!r} reaches the objective on one route only"
        if row is None:
            continue
        error, norm = float(np.linalg.norm(row - grad)), float(np.linalg.norm(grad))
        if error > AGREE_RTOL * norm + AGREE_FLOOR * total:
            return (f"its rows of {key!r} differ from the framework's own gradient of the "
                    f"first example by {error:.3g} (norm {norm:.3g}): this backend computes "
                    "that layer differently from the formula gradkit's factors follow")
    return None


def _first_row(part: Any, shape: tuple, dtype: Any) -> np.ndarray:
    """Row 0 of one variable's part (a Factor, an (n, ...) array, or a list of arrays)."""
    if isinstance(part, Factor):
        part = part._replace(inputs=None if part.inputs is None else part.inputs[:1],
                             deltas=part.deltas[:1])
    else:
        part = part[:1]
    row = np.empty((1, *shape), dtype)
    write_rows(part, row)
    return row[0].astype(np.float64)


def _on_trial(route: Route, operation: str) -> str:
    """The open route still to be timed for `operation` that has run the fewest chunks (the
    first in `ROUTES` on a tie: the routes take turns, so a spell of load on a shared host
    falls on all of them), else the fastest timed."""
    timed = {name: route.costs.get((operation, name), [])
             for name in ROUTES if name not in route.reasons}
    best = min((min(c) for c in timed.values() if c), default=None)
    pending = [name for name, costs in timed.items() if len(costs) < TIMINGS
               and not (costs and min(costs) > KEEP[len(costs) - 1] * best)]
    if pending:
        return min(pending, key=lambda name: len(timed[name])
                   + bool(route.sizes.get((operation, name))))
    # a tie goes to the route first in ROUTES
    return next((name for name in timed if timed[name] and min(timed[name]) <= TIE * best),
                "loop")


def _timed(route: Route, request: Any, operation: str, name: str, seconds: float) -> None:
    """Record a timing; once every open route is timed (or dropped), keep the fastest."""
    route.costs.setdefault((operation, name), []).append(seconds)
    pick = _on_trial(route, operation)
    if len(route.costs.get((operation, pick), [])) >= TIMINGS:
        route.chosen[operation] = pick
        logger.debug("gradkit: per-example %s of model %r: the %s route (seconds per example: "
                     "%s)", operation, request.model.name, pick,
                     {key[1]: min(c) for key, c in route.costs.items()
                      if key[0] == operation and c})


def _give_up(route: Route, request: Any, name: str, reason: str) -> None:
    route.reasons[name] = reason
    if name == "vectorized":
        logger.warning(
            "gradkit: per-example gradients of model %r are computed with a loop over "
            "examples, not the %s vectorizer (%s). Same values; decided once for this model "
            "and selection.", request.model.name, request.flavour, reason)
    else:
        logger.warning(
            "gradkit: the compiled loop over examples failed on model %r (%s); each "
            "example's gradient is computed by its own call instead. Same values; decided "
            "once for this model and selection.", request.model.name, reason)


def first_line(error: BaseException) -> str:
    """``Type: message``: the first meaningful line of `error` or of what caused it (not
    TensorFlow's "in user code:" nor Keras' "Exception encountered when calling ...")."""
    seen = error
    while seen is not None:
        frame_indent = None  # below a "File ..." line, its more indented source line
        for raw in _ANSI.sub("", str(seen)).splitlines():
            line, indent = raw.strip(), len(raw) - len(raw.lstrip())
            if frame_indent is not None and indent > frame_indent and line:
                frame_indent = None
                continue
            frame_indent = indent if line.startswith("File ") else None
            if line and frame_indent is None and not _NOISE.match(line):
                name = type(seen).__name__
                return (line if line.startswith(name) else f"{name}: {line}")[:240]
        seen = seen.__cause__ or seen.__context__
    return type(error).__name__
