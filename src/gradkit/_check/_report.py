"""What a gradient check found: per variable, the verdict of autodiff against finite differences.

For a variable w, D random unit directions d_j and two steps h > h' (relative to max(‖w‖, 1)):

    autodiff    a_j = ⟨∇L, d_j⟩                         (gradkit's gradient, i.e. the framework's)
    central     c_j(h) = (L(w + h d_j) − L(w − h d_j)) / 2h
    estimate    c*_j = (100 c_j(h') − c_j(h)) / 99      (Richardson, h = 10 h': no h² error)
    one-sided   s_j(h) = (L(w + h d_j) − 2 L(w) + L(w − h d_j)) / h   (≈ h L'' where L is smooth)

Norms are over the D directions, relative to ``scale`` = the largest of ‖a‖, ‖c(h)‖, ‖c(h')‖ plus
the rounding noise of a difference quotient (measured on the copy). ``relative_error`` =
‖a − c*‖ / scale. Verdicts: ``"ok"`` if it is within the tolerance; else ``"not smooth"`` if the
finite differences themselves are unstable (the two steps disagree, or s(h') does not shrink
like h': a kink such as ReLU at 0, a max-pooling tie) by at least a tenth of that error, since
then no finite difference can judge the gradient; else ``"mismatch"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: (large step, small step) relative to max(‖w‖, 1), and the relative tolerance, per precision
STEPS = {"float64": (1e-5, 1e-6), "float32": (1e-1, 1e-2)}
RTOL = {"float64": 1e-5, "float32": 3e-2}
#: Autodiff's own rounding, relative to the largest directional derivative of the check: a
#: variable whose true derivative is 0 (an invariance) gets roundoff from both sides.
FLOOR = {"float64": 1e-12, "float32": 1e-5}


@dataclass(frozen=True, repr=False)
class VariableCheck:
    """One variable's check: per direction, the autodiff directional derivative and the
    central differences at the large and small step; the relative error and the verdict."""

    autodiff: np.ndarray
    fd_large: np.ndarray
    fd_small: np.ndarray
    relative_error: float
    verdict: str

    def __repr__(self) -> str:
        return (f"VariableCheck(verdict={self.verdict!r}, relative_error="
                f"{self.relative_error:.2e}, directions={len(self.autodiff)})")


def judge(autodiff, large, small, curv_large, curv_small, noise: float, rtol: float,
          ratio: float, floor: float) -> VariableCheck:
    """The VariableCheck of one variable's numbers (see the module docstring); `noise` is the
    rounding noise of a difference quotient at the small step, `floor` the smallest scale
    (see FLOOR); `ratio` = h' / h."""
    a, cl, cs = (np.asarray(v, np.float64) for v in (autodiff, large, small))
    scale = max(np.linalg.norm(a), np.linalg.norm(cl), np.linalg.norm(cs), floor) \
        + noise * np.sqrt(len(a)) + 1e-300
    estimate = (cs - ratio ** 2 * cl) / (1 - ratio ** 2)
    error = float(np.linalg.norm(a - estimate) / scale)
    spread = np.linalg.norm(cl - cs) / scale
    kink = np.linalg.norm(np.asarray(curv_small) - ratio * np.asarray(curv_large)) / scale
    if error <= rtol:
        verdict = "ok"
    elif max(spread, kink) >= 0.1 * error:
        verdict = "not smooth"
    else:
        verdict = "mismatch"
    return VariableCheck(a, cl, cs, error, verdict)


@dataclass(frozen=True, repr=False)
class GradientCheck:
    """The result of ``check_gradients``: ``variables`` maps each variable key to its
    `VariableCheck`; ``ok`` is True when no variable is a ``"mismatch"`` (``"not smooth"``
    is inconclusive, not a failure). ``precision`` is ``"float64"`` or ``"float32"`` (the
    fallback, with wider steps and tolerance: see ``note``)."""

    variables: dict
    precision: str
    steps: tuple
    rtol: float
    note: str = field(default="")

    @property
    def ok(self) -> bool:
        return all(v.verdict != "mismatch" for v in self.variables.values())

    def verdicts(self) -> dict:
        """``{variable key: verdict}``."""
        return {key: v.verdict for key, v in self.variables.items()}

    def __str__(self) -> str:
        rows = [("variable", "|autodiff|", "rel. error", "verdict")]
        for key, v in self.variables.items():
            rows.append((key, f"{np.linalg.norm(v.autodiff):.3e}",
                         f"{v.relative_error:.2e}", v.verdict))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in
                                                        zip(r[1:3], widths[1:3])] + [r[3]])
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        counts = {name: sum(v.verdict == name for v in self.variables.values())
                  for name in ("ok", "not smooth", "mismatch")}
        lines.append(
            f"{'OK' if self.ok else 'MISMATCH'}: {counts['ok']} ok, {counts['not smooth']} "
            f"not smooth, {counts['mismatch']} mismatch ({self.precision}, "
            f"{len(next(iter(self.variables.values())).autodiff) if self.variables else 0} "
            f"directions, steps {self.steps[0]:g}/{self.steps[1]:g}, rtol {self.rtol:g})")
        if self.note:
            lines.append("note: " + self.note)
        return "\n".join(lines)

    __repr__ = __str__
