"""The recorded update's sums and counts on torch, whose step runs eagerly.

The same rows, counts and update squares as `_ingraph` (see its module docstring), bit for
bit on the fast path, with as few torch calls and fresh tensors as the statistics allow: in
an eager step every call costs its Python dispatch and every new megabyte tensor its page
faults. So the per-variable minima and maxima are read to the host once (one sync), branches
are Python ``if``s, and the bin index (uint8 for up to 256 bins), the shifted gradient and
the weights kept for ``update_ratio`` live in buffers reused from one update to the next.
A large gradient's histogram counts its entries in pairs (`_ingraph.histogram`).
A variable whose maximum |g| is outside (1e-17, 1e17) takes `_ingraph`'s scaled path.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

from gradkit._monitor import _ingraph as ingraph


def _no_grad(method: Any) -> Any:
    """Run `method` without recording torch operations (the weights require grad)."""
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any) -> Any:
        with self.torch.no_grad():
            return method(self, *args)

    return wrapper


class EagerStats:
    """`rows`, `snapshot` and `update_squares` for the torch step, with their buffers."""

    def __init__(self, xp: SimpleNamespace, bins: int) -> None:
        import torch

        self.torch, self.xp, self.bins = torch, xp, bins
        self._float = self._int = self._pairs = torch.empty(0)
        self._kept: list = []

    def _scratch(self, size: int) -> tuple[Any, Any]:
        torch = self.torch
        if self._float.numel() < size:
            self._float = torch.empty(size)
            small = self.bins <= 256  # bincount reads a uint8 index faster
            self._int = torch.empty(size, dtype=torch.uint8 if small else torch.int32)
        return self._float[:size], self._int[:size]

    @_no_grad
    def rows(self, grads: list, weights: list, sums: list) -> tuple[Any, Any]:
        """((n, len(ROW)) float32, (n, 3 + bins) int32) of finite 1-D `grads`, `weights`."""
        torch, bins = self.torch, self.bins
        lo, hi = torch.stack([torch.stack(torch.aminmax(g)) for g in grads]).unbind(1)
        shift = torch.stack(sums) / torch.tensor([g.numel() for g in grads], dtype=lo.dtype)
        width = hi - lo
        top = torch.where(width > 0, hi, lo + torch.clamp(torch.abs(lo), min=1.0))
        k = bins / (top - lo)
        biggest = torch.maximum(hi, -lo).tolist()
        one, zero, none = torch.ones(()), torch.zeros(()), torch.zeros((), dtype=torch.int64)
        rows, counts = [], []
        for g, w, big, lo_i, hi_i, shift_i, k_i in zip(grads, weights, biggest, lo.unbind(),
                                                       hi.unbind(), shift.unbind(), k.unbind()):
            w2 = torch.dot(w, w)
            if not (big == 0.0 or 1e-17 < big < 1e17):  # scaled, as _ingraph does
                row, count = ingraph.masked_rows(self.xp, g, bins)
                rows.append(torch.cat([row, w2.reshape(1)]))
                counts.append(count.to(torch.int64))
                continue
            scratch, index = self._scratch(g.numel())
            d = torch.sub(g, shift_i, out=scratch)
            rows.append(torch.stack([lo_i, hi_i, shift_i, one, zero, torch.dot(d, d), w2]))
            zeros = g.numel() - torch.count_nonzero(g)
            if bins == 1:  # no histogram asked for: one bin holds every entry
                hist = (zeros * 0 + g.numel()).reshape(1)
            else:
                index.copy_(torch.sub(g, lo_i, out=scratch).mul_(k_i).clamp_(max=bins - 1.0))
                hist = self._bincount(index)
            counts.append(torch.cat([torch.stack([zeros, none, none]), hist]))
        return torch.stack(rows), torch.stack(counts).to(torch.int32)

    def _bincount(self, index: Any) -> Any:
        """Counts of each bin in `index`, as ``torch.bincount``; a large gradient's in pairs
        of entries, as `_ingraph.histogram` does, in a reused int16 buffer."""
        torch, bins, size = self.torch, self.bins, index.numel()
        if not ingraph.paired(size, bins):
            return torch.bincount(index, minlength=bins)
        half = size // 2
        if self._pairs.numel() < half:
            self._pairs = torch.empty(half, dtype=torch.int16)
        pairs = self._pairs[:half]
        pairs.copy_(index[:half])
        pairs.mul_(bins).add_(index[half:2 * half])
        joint = torch.bincount(pairs, minlength=bins * bins).view(bins, bins)
        counts = joint.sum(0) + joint.sum(1)
        if size % 2:
            counts += torch.bincount(index[-1:], minlength=bins)
        return counts

    @_no_grad
    def snapshot(self, values: list) -> list:
        """Copies of `values` (the weights before the update) in buffers kept for the next."""
        if [v.shape for v in self._kept] != [v.shape for v in values]:
            self._kept = [self.torch.empty_like(v) for v in values]
        for kept, value in zip(self._kept, values):
            kept.copy_(value)
        return self._kept

    @_no_grad
    def update_squares(self, old: list, new: list) -> Any:
        """(n,) float32: Σ (w_after - w_before)² per variable."""
        torch, out = self.torch, []
        for before, after in zip(old, new):
            scratch, _ = self._scratch(after.numel())
            d = torch.sub(after.reshape(-1), before.reshape(-1), out=scratch)
            out.append(torch.dot(d, d))
        return torch.stack(out)
