"""Temporary shim while the factor registry moves here."""
from gradkit._backends._layer_factors import (  # noqa: F401
    Factor, LayerTaps, Ops, Planned, assemble, factor_arrays, rest,
)
from gradkit._backends._layer_factors import plan as _plan


def plan(model, variables, layers):
    return _plan(model, variables, layers.Dense, layers.Embedding,
                 (layers.Conv1D, layers.Conv2D, layers.Conv3D))
from gradkit._rows import write_rows  # noqa: F401,E402
