"""Records of the monitor, pure NumPy: one flat dict per recorded update, and the history.

A record is flat: ``{"step", "epoch", "batch", "<scope>/<stat>/<key>": value}`` with scope
``variables`` (key = variable path), ``layers`` (key = the path without its last part) or
``total`` (no key). Histograms (variables only) are ``variables/histogram/<key>`` (counts)
and ``variables/histogram_range/<key>`` ([min, max] of that record). The writers store
records as they are; `history_of` turns a list of them into NumPy arrays by step::

    history["step"]                                  (R,) update index (optimizer.iterations)
    history["variables"]["norm"]["dense/kernel"]     (R,)
    history["layers"]["norm"]["dense"]               (R,)
    history["total"]["norm"]                         (R,)
    history["variables"]["histogram"]["dense/kernel"]  (R, bins)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradkit._errors import InvalidArgumentError, received
from gradkit._stats import layer_of

STATS = ("norm", "max_abs", "mean", "std", "zero_fraction", "nan_count", "inf_count",
         "weight_norm", "update_ratio", "histogram")
META = ("step", "epoch", "batch")


def variable_stats(rows: np.ndarray, counts: np.ndarray, updates: np.ndarray, clipped: Any,
                   sizes: list, histogram: bool) -> list[dict]:
    """Per variable: the statistics of one record, in float64 from the step's sums and counts
    (`_ingraph.ROW`; exact: the norm from the scaled sum of squares, mean and std from the
    shifted sums).

    Over the FINITE entries (NaN and Inf are counted, never dropped silently): norm, max_abs,
    mean, std (population), zero_fraction (exact zeros / size); the histogram has equal bins
    from this record's min to max of that variable (``histogram_range``).
    """
    out = []
    for i, size in enumerate(sizes):
        lo, hi, shift, scale, d1, d2, w2 = (float(x) for x in rows[i])
        zeros, nan, inf = (float(x) for x in counts[i][:3])
        n = size - nan - inf
        s = {"nan_count": nan, "inf_count": inf, "finite": n, "size": float(size),
             "zero_fraction": zeros / max(size, 1), "weight_norm": float(np.sqrt(w2)),
             "update_sq": float(updates[i])}
        if n:
            scaled_sq = d2 + 2.0 * shift * scale * d1 + n * (shift * scale) ** 2
            s.update(norm=float(np.sqrt(max(scaled_sq, 0.0))) / scale, max_abs=max(-lo, hi),
                     mean=shift + d1 / scale / n,
                     std=float(np.sqrt(max(d2 - d1 * d1 / n, 0.0) / n)) / scale)
        else:
            s.update(norm=0.0, max_abs=0.0, mean=0.0, std=0.0)
        if histogram:
            hist = counts[i][3:].astype(np.float64)
            if n and hi == lo:  # one value: the last bin, as for any maximum
                hist = np.zeros_like(hist)
                hist[-1] = n
            s.update(histogram=hist, histogram_range=np.array([lo, hi]))
        if clipped is not None:
            sq, big, c_scale = (float(x) for x in clipped[i])
            s["clipped_norm"], s["clipped_max_abs"] = float(np.sqrt(sq)) / c_scale, big
        out.append(s)
    return out


def norms(rows: np.ndarray, counts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(n,) float64: each variable's gradient norm, as `variable_stats` gives it, for all
    variables of one record at once."""
    lo, hi, shift, scale, d1, d2 = np.asarray(rows, np.float64)[:, :6].T
    n = sizes - counts[:, 1] - counts[:, 2]
    scaled_sq = d2 + 2.0 * shift * scale * d1 + n * (shift * scale) ** 2
    return np.where(n > 0, np.sqrt(np.maximum(scaled_sq, 0.0)) / scale, 0.0)


def combine(parts: list[dict]) -> dict:
    """The statistics of several variables taken together (exact pooled mean and std)."""
    n = np.array([p["finite"] for p in parts])
    means = np.array([p["mean"] for p in parts])
    total = max(n.sum(), 1.0)
    mean = float(np.sum(n * means) / total)
    var = np.sum(n * (np.array([p["std"] for p in parts]) ** 2 + (means - mean) ** 2)) / total
    out = {"norm": float(np.sqrt(sum(p["norm"] ** 2 for p in parts))),
           "max_abs": max(p["max_abs"] for p in parts), "mean": mean, "std": float(np.sqrt(var)),
           "zero_fraction": sum(p["zero_fraction"] * p["size"] for p in parts)
           / sum(p["size"] for p in parts),
           "nan_count": sum(p["nan_count"] for p in parts),
           "inf_count": sum(p["inf_count"] for p in parts)}
    if "clipped_norm" in parts[0]:
        out["clipped_norm"] = float(np.sqrt(sum(p["clipped_norm"] ** 2 for p in parts)))
        out["clipped_max_abs"] = max(p["clipped_max_abs"] for p in parts)
    if "weight_norm" in parts[0]:
        out["weight_norm"] = float(np.sqrt(sum(p["weight_norm"] ** 2 for p in parts)))
        out["update_sq"] = sum(p["update_sq"] for p in parts)
    return out


def flat_record(meta: dict, keys: list, per_variable: list[dict], stats: tuple) -> dict:
    """One flat record: `meta` then the chosen `stats` per variable, per layer and in total."""
    record: dict[str, Any] = dict(meta)
    groups: dict[str, list] = {}
    for key, s in zip(keys, per_variable):
        groups.setdefault(layer_of(key), []).append(s)
        _put(record, "variables", key, s, stats)
    for layer, parts in groups.items():
        _put(record, "layers", layer, combine(parts), stats)
    _put(record, "total", None, combine(per_variable), stats)
    return record


def _put(record: dict, scope: str, key: Any, s: dict, stats: tuple) -> None:
    if "update_sq" in s and s.get("weight_norm", 0) > 0:
        s = dict(s, update_ratio=float(np.sqrt(s["update_sq"]) / s["weight_norm"]))
    names = [n for n in stats if n != "histogram"]
    names += [f"clipped_{n}" for n in ("norm", "max_abs") if n in stats]
    if "histogram" in stats and scope == "variables":
        names += ["histogram", "histogram_range"]
    suffix = "" if key is None else "/" + key
    for name in names:
        if name in s:
            value = s[name]
            record[f"{scope}/{name}{suffix}"] = (
                [float(x) for x in value] if np.ndim(value) else float(value))


def check_one_history(held: list | None, keys: list, model_name: str) -> None:
    """Raise if records of the variables `held` cannot share a history with `keys`'."""
    if held is not None and keys != held:
        raise InvalidArgumentError(
            f"This GradientMonitor holds the records of other variables ({held[:3]}...) than "
            f"model {model_name!r} trains; it keeps one history. Give this fit a new "
            "GradientMonitor (the old one keeps its records). " + received(model=model_name))


def history_of(records: list[dict]) -> dict:
    """The nested history of NumPy arrays (see the module docstring) from flat records."""
    history: dict[str, Any] = {m: np.array([r[m] for r in records], dtype=np.int64)
                               for m in META}
    history.update(variables={}, layers={}, total={})
    names = list(records[0]) if records else []
    for name in names:
        if name in META:
            continue
        scope, _, rest = name.partition("/")
        stat, _, key = rest.partition("/")
        values = np.array([r.get(name, np.nan) for r in records], dtype=np.float64)
        if scope == "total":
            history["total"][stat] = values
        else:
            history[scope].setdefault(stat, {})[key] = values
    return history
