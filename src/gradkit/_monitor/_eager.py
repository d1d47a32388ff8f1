"""The recorded update's sums and counts on torch, whose step runs eagerly.

The same rows, counts and update squares as `_ingraph` (see its module docstring), bit for
bit on the fast path, with as few torch calls and fresh tensors as the statistics allow: in
an eager step every call costs its Python dispatch and every new megabyte tensor its page
faults. So the per-variable minima and maxima are read to the host once (one sync), branches
are Python ``if``s, and the bin index (int16), the shifted gradient and the weights kept for
``update_ratio`` live in buffers reused from one update to the next. Each pass over a large
gradient costs about as much as reading it from memory, so the histogram takes as few as
it can: the maximum's index ``bins`` is counted in an extra bin and folded into the last
one afterwards (no clamping pass), and a large gradient's entries are counted in pairs
(`_ingraph.histogram`) formed by one ``add``. A variable whose maximum |g| is outside
(1e-17, 1e17) takes `_ingraph`'s scaled path.

Small float32 variables on the CPU (under `_ingraph.PAIRED` entries: biases, normalization
scales, most kernels of a deep narrow model) are summed and counted by NumPy on the tensors'
own memory: a torch call costs a few microseconds of dispatch, which over the dozen calls a
variable needs outweighs the work (the 66 variables of a 16-block Dense/BatchNormalization
model: 2.7 -> 1.3 ms a recorded update; an MLP whose time is in two large kernels:
unchanged). Same arithmetic in float32: the counts and extremes are the torch path's bit for
bit, the sums of squares equal to rounding.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import numpy as np

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
            small = self.bins < 2**15 - 1  # indices 0 .. bins
            self._int = torch.empty(size, dtype=torch.int16 if small else torch.int32)
        return self._float[:size], self._int[:size]

    @_no_grad
    def rows(self, grads: list, weights: list, sums: list) -> tuple[Any, Any]:
        """((n, len(ROW)) float32, (n, 3 + bins) int32) of finite 1-D `grads`, `weights`."""
        torch = self.torch
        on_host = self._on_host(grads, weights, sums)
        if not on_host:
            return self._torch_rows(grads, weights, sums)
        rest = [i for i in range(len(grads)) if i not in on_host]
        host = [np.stack(part) for part in zip(*on_host.values())]  # rows, counts
        if rest:  # (on the CPU too: put together in NumPy)
            done = self._torch_rows(*([items[i] for i in rest]
                                      for items in (grads, weights, sums)))
            for k, (theirs, mine) in enumerate(zip(done, host)):
                host[k] = np.empty((len(grads), mine.shape[1]), mine.dtype)
                host[k][rest], host[k][list(on_host)] = theirs.numpy(), mine
        return torch.from_numpy(host[0]), torch.from_numpy(host[1])

    def _on_host(self, grads: list, weights: list, sums: list) -> dict:
        """{index: (row, counts)} of the small float32 CPU variables NumPy takes (those not in
        the plain range of `host_stats` are left to torch)."""
        torch, found = self.torch, {}
        small = [i for i, (g, w) in enumerate(zip(grads, weights))
                 if g.numel() < ingraph.PAIRED and g.device.type == "cpu"
                 and g.dtype == w.dtype == torch.float32]
        if small:
            totals = torch.stack([sums[i] for i in small]).numpy()
            for i, total in zip(small, totals):
                stats = host_stats(grads[i].detach().numpy(), weights[i].detach().numpy(),
                                   total, self.bins)
                if stats is not None:
                    found[i] = stats
        return found

    def _torch_rows(self, grads: list, weights: list, sums: list) -> tuple[Any, Any]:
        torch, bins = self.torch, self.bins
        lo, hi = torch.stack([torch.stack(torch.aminmax(g)) for g in grads]).unbind(1)
        shift = torch.stack(sums) / torch.tensor([g.numel() for g in grads], dtype=lo.dtype)
        width = hi - lo
        top = torch.where(width > 0, hi, lo + torch.clamp(torch.abs(lo), min=1.0))
        k = bins / (top - lo)
        biggest = torch.maximum(hi, -lo).tolist()
        finite_rows, scaled, counts = [], {}, []
        for i, (g, w, big, lo_i, shift_i, k_i) in enumerate(zip(
                grads, weights, biggest, lo.unbind(), shift.unbind(), k.unbind())):
            if not (big == 0.0 or 1e-17 < big < 1e17):  # scaled, as _ingraph does
                row, count = ingraph.masked_rows(self.xp, g, bins)
                scaled[i] = torch.cat([row, torch.dot(w, w).reshape(1)])
                counts.append(count.to(torch.int64))
                continue
            scratch, index = self._scratch(g.numel())
            d = torch.sub(g, shift_i, out=scratch)
            finite_rows.append((i, torch.dot(d, d), torch.dot(w, w)))
            zeros = g.numel() - torch.count_nonzero(g)
            if bins == 1:  # no histogram asked for: one bin holds every entry
                hist = (zeros * 0 + g.numel()).reshape(1)
            else:
                index.copy_(torch.sub(g, lo_i, out=scratch).mul_(k_i))  # 0 .. bins
                hist = self._bincount(index)
            counts.append(torch.cat([zeros.reshape(1), hist.new_zeros(2), hist]))
        return self._rows(lo, hi, shift, finite_rows, scaled), torch.stack(counts).to(torch.int32)

    def _rows(self, lo: Any, hi: Any, shift: Any, plain: list, scaled: dict) -> Any:
        """The (n, len(ROW)) rows: the plain variables' columns stacked at once, then the
        scaled ones' rows put in their places."""
        torch = self.torch
        rows = torch.zeros((len(lo), len(ingraph.ROW))) if scaled else None
        if plain:
            at = [i for i, _, _ in plain]
            d2, w2 = (torch.stack(column) for column in list(zip(*plain))[1:])
            one = torch.ones_like(d2)
            extremes = [lo[at], hi[at], shift[at]] if scaled else [lo, hi, shift]
            stacked = torch.stack([*extremes, one, one * 0, d2, w2], 1)
            if not scaled:  # the usual case
                return stacked
            rows[at] = stacked
        for i, row in scaled.items():
            rows[i] = row
        return rows

    def _bincount(self, index: Any) -> Any:
        """Counts of bins 0 .. bins - 1 in `index` (0 .. bins: the maximum's ``bins`` counts
        in the last bin), as `_ingraph.histogram`; a large gradient's in pairs of entries
        ``a·(bins + 1) + b``, formed by one ``add`` into a reused int16 buffer."""
        torch, bins, size = self.torch, self.bins, index.numel()
        base = bins + 1
        if not ingraph.paired(size, base):
            counts = torch.bincount(index, minlength=base)
        else:
            half = size // 2
            if self._pairs.numel() < half:
                self._pairs = torch.empty(half, dtype=torch.int16)
            pairs = torch.add(index[half:2 * half], index[:half], alpha=base,
                              out=self._pairs[:half])
            joint = torch.bincount(pairs, minlength=base * base).view(base, base)
            counts = joint.sum(0) + joint.sum(1)
            if size % 2:
                counts += torch.bincount(index[-1:], minlength=base)
        counts[bins - 1] += counts[bins]
        return counts[:bins]

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
            if after.numel() < ingraph.PAIRED and after.device.type == "cpu" and (
                    after.dtype == torch.float32):  # NumPy: see the module docstring
                d = np.subtract(after.detach().numpy(), before.numpy()).reshape(-1)
                out.append(torch.from_numpy(np.asarray(np.dot(d, d))))
                continue
            scratch, _ = self._scratch(after.numel())
            d = torch.sub(after.reshape(-1), before.reshape(-1), out=scratch)
            out.append(torch.dot(d, d))
        return torch.stack(out)


def host_stats(g: np.ndarray, w: np.ndarray, total: np.float32,
               bins: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(row, counts) of `_ingraph.ROW` and counts for a finite float32 gradient `g` (1-D)
    whose Σ is `total`, in NumPy float32 as `EagerStats` computes them in torch; None when
    max |g| needs `_ingraph`'s scaled path."""
    size, lo, hi = g.size, g.min(), g.max()
    biggest = max(hi, -lo)
    if not (biggest == 0.0 or 1e-17 < biggest < 1e17):
        return None
    shift = total / np.float32(size)
    d = g - shift
    counts = np.zeros(3 + bins, np.int32)
    counts[0] = size - np.count_nonzero(g)
    if bins == 1:
        counts[3] = size
    else:
        top = hi if hi - lo > 0 else lo + max(abs(lo), np.float32(1.0))
        index = ((g - lo) * (np.float32(bins) / (top - lo))).astype(np.intp)  # 0 .. bins
        counts[3:] = np.bincount(np.minimum(index, bins - 1), minlength=bins)
    row = np.array([lo, hi, shift, 1.0, 0.0, np.dot(d, d), np.dot(w, w)], np.float32)
    return row, counts
