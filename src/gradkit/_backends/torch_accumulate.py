"""Streaming accumulation on Keras 3 with PyTorch (gradkit.accumulate): eager autograd per
batch, ``weight * gradient`` added in place into tensors on the model's device."""

from __future__ import annotations

import torch

from gradkit._backends import _keras3 as k3
from gradkit._backends.torch import _to_tensor, kept_rng
from gradkit._data import Batch, map_structure
from gradkit._objective import Objective


def gradient_accumulator(model, variables, objective: Objective, training: bool,
                         skip_nonfinite: bool):
    """A running sum Σ_b w_b ∇L_b kept on the device (see gradkit._accumulate)."""
    k3.check_built(model)
    return _Accumulator(model, variables, objective, bool(training), bool(skip_nonfinite))


class _Accumulator:
    """Eager autograd per batch; ``weight * gradient`` added in place into device tensors,
    masked to zero when `skip_nonfinite` and the batch has any NaN/Inf (no host sync)."""

    def __init__(self, model, variables, objective, training, skip_nonfinite) -> None:
        self._model, self._training, self._skip = model, training, skip_nonfinite
        self._objective = k3.prepare_objective(objective)
        self._selected = k3.selected_indices(model, variables)
        self._scale = k3.loss_scale(model)
        self._sums = [torch.zeros(tuple(v.shape), device=v.value.device,
                                  dtype=torch.float64 if v.dtype == "float64" else torch.float32)
                      for v in variables]
        self.connected: list[bool] | None = None

    def add(self, batch: Batch, weight: float):
        grads = self._gradients(batch)
        if self.connected is None:
            self.connected = [g is not None for g in grads]
        flags = [_all_finite(g) if g is not None else torch.tensor(True) for g in grads]
        finite = torch.stack([f.to(self._sums[0].device) for f in flags])
        keep = finite.all() if self._skip else None
        with torch.no_grad():
            for total, g in zip(self._sums, grads):
                if g is None:
                    continue
                g = g.to(total.dtype)
                total.add_(torch.where(keep, g, 0.0) if self._skip else g,
                           alpha=weight / self._scale)
        return finite

    def _gradients(self, batch: Batch) -> tuple:
        x, y, sample_weight = (map_structure(_to_tensor, v)
                               for v in (batch.x, batch.y, batch.sample_weight))
        trainable, non_trainable, metrics = k3.variable_values(self._model)
        chosen = set(self._selected)
        trainable = [v if i in chosen else v.detach() for i, v in enumerate(trainable)]
        with torch.enable_grad():
            loss = k3.objective_value(self._model, self._objective, self._training, trainable,
                                      non_trainable, metrics, x, y, sample_weight)
            return torch.autograd.grad(loss.float() * self._scale,
                                       [trainable[i] for i in self._selected], allow_unused=True)

    def running(self):
        """Around the whole pass: torch's global RNG (unseeded dropout) is restored after."""
        return kept_rng()

    @property
    def flag_lag(self) -> int:
        """Batches whose flags may be outstanding: none on CPU (eager torch is synchronous
        there), a group on an accelerator, so the host waits once per group."""
        return 0 if self._sums[0].device.type == "cpu" else 8

    def finite(self, flags: list) -> list:
        return [f.cpu().numpy() for f in flags]

    def total(self) -> list:
        return [s.cpu().numpy() for s in self._sums]


def _all_finite(g: torch.Tensor) -> torch.Tensor:
    """True unless g holds a NaN or Inf. On CPU a plain sum (NaN/Inf propagate) decides in
    one fast pass and isfinite(g).all(), many times slower there, only confirms a non-finite
    sum (which a huge but finite g can give); elsewhere (g * 0).sum(), exact and host-free."""
    if g.device.type != "cpu":
        return torch.isfinite((g * 0).sum())
    return torch.tensor(bool(torch.isfinite(g.sum())) or bool(torch.isfinite(g).all()))
