"""How per-example work runs for one model and selection: chosen once, remembered.

Two routes give the same rows. "vectorized" is the adapter's ``per_example_parts`` (factors
and the framework's vectorizer inside one compiled function); "loop" runs the adapter's
compiled, cached single-example gradient once per example. Per model, variables, objective
and training mode (one `Route` in the model's cache of compiled functions) gradkit remembers:

- a hazard: the framework's vectorizer is known to crash the process or return wrong rows on
  an op the model uses (``adapter.vectorize_hazard``: TensorFlow's pfor over Einsum kernels
  under oneDNN). The vectorized route is never taken;
- a failure: the vectorized route raised once (a converter gap, e.g. TensorFlow's while
  loops of recurrent layers). It is never retried;
- a timing, per operation (rows, norms): `TIMINGS` chunks of an already compiled size are
  timed on the vectorized route, then, after one untimed chunk that compiles it, as many on
  the loop; the faster by its best time is kept. Every chunk computed meanwhile is a real
  result.

A hazard or failure is logged once per Route on the ``"gradkit"`` logger, with its reason:
the framework's own first meaningful line, or the op.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Callable

from gradkit._backends import _cache
from gradkit._errors import GradkitError, original_errors

logger = logging.getLogger("gradkit")
_NOISE = re.compile(r"^(in user code:|Traceback|File |Exception encountered when calling|"
                    r"Arguments received by|•|\^+$|~+$|During handling|The above exception|"
                    r"Graph execution error|Detected at node|\[\[|vectorizing failed:$)")
#: Timed chunks per route before the faster is kept (the best of them counts: load spikes)
TIMINGS = 2
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Route:
    """What was learnt about one model and selection (see the module docstring)."""

    def __init__(self) -> None:
        self.reason: str | None = None  # why the vectorized route is not taken
        self.hazard_checked = False
        self.chosen: dict[str, str] = {}  # operation -> "vectorized" | "loop"
        self.sizes: dict[str, set] = {}  # operation -> chunk sizes run vectorized
        self.vector_cost: dict[str, list] = {}  # operation -> seconds per example, timed
        self.loop_cost: dict[str, list] = {}  # the same in the loop (absent: not compiled)


def route_of(request: Any) -> Route:
    """The Route of `request`'s model and selection (created on first use)."""
    return _cache.cached(request.model, ("per_example_route", request.cache_key()), Route)


def run_chunk(request: Any, operation: str, store: Callable, start: int, stop: int,
              loop: Callable, check: Callable) -> None:
    """Compute the parts of the chunk `request` (examples ``start:stop`` of the call) on the
    route chosen for `operation` and hand them to ``store(start, stop, parts)``; `loop` is the
    loop route, `check(parts)` runs before anything is stored."""
    route = route_of(request)
    if route.reason is None and not route.hazard_checked:
        route.hazard_checked = True
        hazard = request.adapter.vectorize_hazard(request)
        if hazard is not None:
            _give_up(route, request, hazard)
    choice = "loop" if route.reason is not None else route.chosen.get(operation)
    if choice is None and len(route.vector_cost.get(operation, ())) == TIMINGS:
        return _loop_trial(route, request, operation, lambda: _stored(
            loop(request), start, stop, store, check), stop - start)
    if choice == "loop":
        return _stored(loop(request), start, stop, store, check)
    _vectorized(route, request, operation, choice is None,
                lambda parts: _stored(parts, start, stop, store, check),
                lambda: _stored(loop(request), start, stop, store, check), stop - start)


def _vectorized(route: Route, request: Any, operation: str, trial: bool, stored: Callable,
                looped: Callable, n: int) -> None:
    """The vectorized route; timed when on trial and the chunk size ran before (compiled)."""
    timed = trial and n in route.sizes.setdefault(operation, set())
    timed = timed and len(route.vector_cost.setdefault(operation, [])) < TIMINGS
    begin = time.perf_counter()
    try:
        with original_errors():
            parts = list(request.adapter.per_example_parts(request))
    except Exception as error:  # noqa: BLE001 - any vectorizer gap: the loop gives the rows
        if isinstance(error, GradkitError):
            raise
        _give_up(route, request, first_line(error))
        return looped()
    stored(parts)
    route.sizes[operation].add(n)
    if timed:
        route.vector_cost[operation].append((time.perf_counter() - begin) / n)


def _loop_trial(route: Route, request: Any, operation: str, looped: Callable, n: int) -> None:
    """The loop's turn: once untimed (it compiles the single-example gradient), then timed
    TIMINGS times; the faster route by its best time is kept for `operation`."""
    costs, begin = route.loop_cost.get(operation), time.perf_counter()
    looped()
    if costs is None:  # this call compiled the single-example gradient: not timed
        route.loop_cost[operation] = []
        return
    costs.append((time.perf_counter() - begin) / n)
    if len(costs) == TIMINGS:
        loop, vector = min(costs), min(route.vector_cost[operation])
        route.chosen[operation] = "loop" if loop < vector else "vectorized"
        logger.debug("gradkit: per-example %s of model %r: the %s route (%.3g s per example "
                     "vectorized, %.3g s in the loop)", operation, request.model.name,
                     route.chosen[operation], vector, loop)


def _stored(parts: list, start: int, stop: int, store: Callable, check: Callable) -> None:
    check(parts)
    store(start, stop, parts)


def _give_up(route: Route, request: Any, reason: str) -> None:
    route.reason = reason
    logger.warning(
        "gradkit: per-example gradients of model %r are computed with a loop over examples "
        "of the compiled single-example gradient, not the %s vectorizer (%s). Same values; "
        "decided once for this model and selection.", request.model.name, request.flavour,
        reason)


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
