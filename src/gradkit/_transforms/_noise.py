"""Gaussian gradient noise:  g ← g + σ·ε,  ε ~ N(0, I) drawn afresh for every update.

The state holds a NumPy Generator. `update` draws from a copy of it and returns the copy in
the new state, so the state passed in is never changed: successive updates (each given the
state the previous one returned) draw different noise, and one state always gives the same.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import numpy as np

from gradkit._errors import InvalidArgumentError, received
from gradkit._seeds import check_seed
from gradkit._transforms._base import (
    Grads,
    HostOnlyTransformation,
    check_grads,
    number,
)
from gradkit._transforms._ops import NumpyOps, ops_for


class AddNoiseState(NamedTuple):
    """The generator the next update draws from."""

    rng: np.random.Generator


def add_noise(stddev: float, seed: int | None = None) -> HostOnlyTransformation:
    """Add independent Gaussian noise of standard deviation `stddev` to every element.

    An int `seed` gives the same noise sequence on every run; ``None`` takes fresh entropy.
    Noise is drawn in float32 (float64 for float64 gradients), in key order. It runs on
    NumPy gradient sets only: `wrap` refuses it (and any chain holding it).
    """
    stddev = number(stddev, "stddev", low=0.0)
    check_seed(seed, "noise", "add_noise(seed=)")

    def init(grads: Grads) -> AddNoiseState:
        check_grads(grads)
        return AddNoiseState(np.random.default_rng(seed))

    def update(grads: Grads, state: AddNoiseState) -> tuple[Grads, AddNoiseState]:
        if ops_for(grads) is not NumpyOps:
            raise InvalidArgumentError(
                "add_noise runs on NumPy gradient sets, not inside a wrapped optimizer's "
                "compiled step (its generator state cannot live there). Add noise in a manual "
                "loop (gradients -> transform -> gradkit.apply), or use "
                "gradkit.clipped_gradients(noise_multiplier=...) for DP-SGD. "
                + received(transform="add_noise"))
        grads, rng = check_grads(grads), copy.deepcopy(state.rng)
        out = {}
        for key, g in grads.items():
            if g is None:
                out[key] = None
                continue
            dtype = np.float64 if g.dtype == np.float64 else np.float32
            noise = rng.standard_normal(g.shape, dtype=dtype)
            out[key] = (g + stddev * noise).astype(g.dtype, copy=False)
        return out, AddNoiseState(rng)

    return HostOnlyTransformation(init, update)
