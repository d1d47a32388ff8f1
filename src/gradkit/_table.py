"""A gradient set as a text table: one row per variable with its shape, L2 norm, mean |g|
and max |g|, and a closing row with the global L2 norm (the norm of all gradients as one
vector, what ``clipnorm``-style global clipping looks at).

    print(gradkit.summary(grads))

Pure NumPy; a ``None`` entry (an unconnected variable) is shown as such, and NaN/Inf show
as ``nan``/``inf`` rather than being hidden.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gradkit._errors import InvalidArgumentError, received

_HEADER = ("variable", "shape", "L2 norm", "mean |g|", "max |g|")


def summary(grads: Mapping[str, Any]) -> str:
    """A text table of a gradient dict: shape, L2 norm, mean |g| and max |g| per variable
    (or of a GradientStats: per layer, the norm of the mean gradient, the mean per-example
    norm, the SNR and the noise scale).

    The last row gives the number of values and the global L2 norm over all variables.
    Statistics are computed in float64 from the arrays as given (no rescaling: a gradient
    of a mean-reduced loss stays a mean-reduced gradient).
    """
    if hasattr(grads, "mean") and hasattr(grads, "layers") and hasattr(grads, "total"):
        return stats_summary(grads)
    if not isinstance(grads, Mapping):
        raise InvalidArgumentError(
            "summary() takes a gradient dict {name: array}, as gradkit.gradients returns. "
            + received(grads=type(grads).__name__)
        )
    rows = [_HEADER]
    total_sq, count = 0.0, 0
    for key, value in grads.items():
        if value is None:
            rows.append((str(key), "-", "unconnected", "-", "-"))
            continue
        array = np.asarray(value, dtype=np.float64)
        magnitude = np.abs(array)
        sq = float(np.sum(np.square(array)))
        total_sq += sq
        count += array.size
        rows.append((
            str(key),
            str(tuple(array.shape)),
            _number(np.sqrt(sq)),
            _number(magnitude.mean()) if array.size else "-",
            _number(magnitude.max()) if array.size else "-",
        ))
    rows.append((f"total ({len(grads)} variables)", f"{count} values",
                 _number(np.sqrt(total_sq)), "", ""))
    return _render(rows)


def stats_summary(stats: Any) -> str:
    """A GradientStats as a table per layer: |mean|, mean example norm, SNR, noise scale."""
    header = ("layer", "|mean g|", "mean |g_i|", "SNR", "noise scale")
    rows = [header] + [
        (str(name), *(_number(v) for v in (s.norm_of_mean, s.mean_example_norm, s.snr,
                                           s.noise_scale)))
        for name, s in [*stats.layers.items(), (f"total ({stats.count} examples)",
                                                 stats.total)]]
    return _render(rows)


def _number(value: float) -> str:
    return f"{float(value):.4e}"


def _render(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0 or n == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
