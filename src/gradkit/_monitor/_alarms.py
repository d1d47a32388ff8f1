"""The monitor's alarms: the first non-finite update (`nonfinite_alarm`), and exploding and
vanishing gradients: thresholds on each layer's gradient norm, warned once.

On every recorded update, for each layer's gradient L2 norm ``n`` (``layers/norm/<layer>``
of the record):

    explode:  n > thresholds["explode"]                       (an absolute bound)
    growth:   n > thresholds["growth"] · (n at the previous record)   (a sudden rise)
    vanish:   n < thresholds["vanish"]                        (zero included)

Each kind is warned about once per layer (a `GradientNormWarning` naming the layer, the
update and the norm) and listed in ``monitor.alarms``. Non-finite norms are left to the NaN
alarm. A threshold of None turns its check off; ``thresholds=None`` turns all off.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from gradkit._errors import GradientNormWarning, InvalidArgumentError, received
from gradkit._monitor._history import norms

DEFAULT_THRESHOLDS = {"explode": 1e3, "growth": 1e2, "vanish": 1e-7}


def nonfinite_alarm(keys: list, counts: Any, step: int, batch: int, epoch: int) -> tuple:
    """(alarm dict, message) of the first update whose gradients held NaN/Inf: `counts` the
    (n, 2) NaN and Inf counts per variable of `keys`, at update `step`, `batch` of `epoch`."""
    bad = {k: (int(r[0]), int(r[1])) for k, r in zip(keys, counts) if r[0] or r[1]}
    alarm = {"kind": "nonfinite", "step": step, "batch": batch, "epoch": epoch,
             "variables": bad}
    names = ", ".join(f"{k} (nan={n}, inf={i})" for k, (n, i) in list(bad.items())[:8])
    text = (f"The gradient of update {step} (epoch {epoch}, batch {batch}) holds NaN/Inf in "
            f"{names}. Lower the learning rate, clip the gradients, or check the data of that "
            "batch: gk.locate_nonfinite(model, x, y) on it names the layer where they first "
            "appear.")
    return alarm, text


def layer_norms(state: list, sizes: np.ndarray, layer_index: np.ndarray,
                layers: list) -> dict:
    """{layer: gradient L2 norm} of one recorded update's state; NaN for a layer holding
    NaN/Inf, whose norm over its finite entries (0 when all are NaN) is no gradient norm."""
    rows, counts = state[0], state[1]
    squares = np.bincount(layer_index, norms(rows, counts, sizes) ** 2, len(layers))
    bad = np.bincount(layer_index, counts[:, 1] + counts[:, 2], len(layers)) > 0
    return dict(zip(layers, np.where(bad, np.nan, np.sqrt(squares)).tolist()))


class NormAlarms:
    """Checks each record's per-layer norms against `thresholds` (see the module docstring)."""

    def __init__(self, thresholds: Any) -> None:
        self.thresholds = _checked(thresholds)
        self._previous: dict[str, float] = {}
        self._warned: set[tuple[str, str]] = set()

    @property
    def active(self) -> bool:
        return any(value is not None for value in self.thresholds.values())

    def check(self, layer_norms: dict, meta: dict) -> list[dict]:
        """The new alarms (each warned about once), as dicts, of one record's `layer_norms`
        ({layer: norm}) and `meta` ({"step", "epoch", ...})."""
        found = []
        for layer, norm in layer_norms.items():
            if not math.isfinite(norm):
                continue
            previous = self._previous.get(layer)
            self._previous[layer] = norm
            for kind in self._kinds(norm, previous):
                if (layer, kind) not in self._warned:
                    self._warned.add((layer, kind))
                    found.append({"kind": kind, "layer": layer, "step": meta["step"],
                                  "epoch": meta["epoch"], "norm": norm})
        for alarm in found:
            warnings.warn(_message(alarm), GradientNormWarning, stacklevel=3)
        return found

    def _kinds(self, norm: float, previous: float | None) -> list[str]:
        t, kinds = self.thresholds, []
        if t.get("explode") is not None and norm > t["explode"]:
            kinds.append("explode")
        if (t.get("growth") is not None and previous is not None and previous > 0
                and norm > t["growth"] * previous):
            kinds.append("growth")
        if t.get("vanish") is not None and norm < t["vanish"]:
            kinds.append("vanish")
        return kinds


def _message(alarm: dict) -> str:
    what = {"explode": "is exploding", "growth": "jumped", "vanish": "is vanishing"}
    advice = {"explode": "Lower the learning rate or clip the gradients "
                         "(clipnorm / gradkit.transforms.clip_by_global_norm).",
              "growth": "Watch the next updates; lower the learning rate or clip if it grows.",
              "vanish": "Check the initialization, the activations (saturated or dead units) "
                        "and whether the layer is still connected to the loss."}
    return (f"The gradient of layer {alarm['layer']!r} {what[alarm['kind']]} at update "
            f"{alarm['step']} (epoch {alarm['epoch']}): norm {alarm['norm']:.3g}. "
            f"{advice[alarm['kind']]} (Warned once per layer; GradientMonitor(thresholds=) "
            "sets the bounds.)")


def _checked(thresholds: Any) -> dict:
    if thresholds is None:
        return {}
    if not isinstance(thresholds, dict) or set(thresholds) - set(DEFAULT_THRESHOLDS):
        raise InvalidArgumentError(
            f"thresholds= takes a dict with keys from {tuple(DEFAULT_THRESHOLDS)} (values: "
            "positive numbers or None), or None to turn the checks off. "
            + received(thresholds=thresholds))
    merged = dict(DEFAULT_THRESHOLDS, **thresholds)
    for key, value in merged.items():
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                               and math.isfinite(value) and value > 0)
        if not ok:
            raise InvalidArgumentError(
                f"thresholds[{key!r}] must be a positive finite number or None. "
                + received(**{key: value}))
    return merged
