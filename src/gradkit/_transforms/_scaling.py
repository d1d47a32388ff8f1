"""Scaling: by one factor, by a factor per layer, and masking (zeroing) whole layers.

    scale(s):                  g ← s · g
    scale_by_layer({p: s_p}):  g ← s_p · g   for the variables of the layers matching p (else 1)
    mask(layers=ps):           g ← 0         for the variables of the layers matching ps

A variable's layer is its key without the last ``/part`` (``"sequential/dense_1/kernel"`` →
``"sequential/dense_1"``; a key without ``/`` is its own layer), as in `gradient_stats`. A
pattern (an fnmatch glob, as in gradkit's ``layers=``) matches a layer if it matches that
layer path or a trailing part of it: ``"dense_1"``, ``"dense*"`` and ``"sequential/dense_1"``
all match ``"sequential/dense_1"``. A pattern that matches no layer of a gradient set is an
error, as is a layer that two patterns of `scale_by_layer` match.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

from gradkit._errors import InvalidArgumentError, UnknownLayerError, received
from gradkit._select import layer_of
from gradkit._transforms._base import GradientTransformation, Grads, map_grads, number, stateless
from gradkit._transforms._ops import ops_for


def scale(factor: float) -> GradientTransformation:
    """Multiply every gradient by `factor` (as ``optax.scale``)."""
    factor = number(factor, "factor")
    return stateless(lambda grads: map_grads(lambda _, g: ops_for(grads).scaled(g, factor),
                                             grads))


def scale_by_layer(factors: Mapping[str, float]) -> GradientTransformation:
    """Multiply the gradients of each layer matching a pattern by that pattern's factor;
    other layers keep theirs (factor 1). E.g. ``scale_by_layer({"embedding": 0.1})``."""
    if not isinstance(factors, Mapping) or not factors:
        raise InvalidArgumentError(
            "scale_by_layer takes a non-empty dict {layer pattern: factor}, e.g. "
            "{'dense_1': 0.1, 'conv*': 0.5}. " + received(factors=factors))
    checked = {_pattern(p, "factors"): number(s, f"factors[{p!r}]") for p, s in factors.items()}

    def owners(grads: Grads) -> dict[str, str]:
        return owner_patterns(grads, list(checked), "scale_by_layer", exclusive=True)

    def rescale(grads: Grads) -> Grads:
        found, ops = owners(grads), ops_for(grads)
        return map_grads(lambda k, g: ops.scaled(g, checked[found[k]] if k in found
                                                 else 1.0), grads)

    return stateless(rescale, check=owners)


def mask(layers: str | Iterable[str]) -> GradientTransformation:
    """Zero the gradients of the layers matching `layers` (a pattern or a list of them), so
    an optimizer step leaves their weights where they are (momentum and weight decay aside)."""
    specs = [layers] if isinstance(layers, str) else list(layers) if isinstance(
        layers, (list, tuple, set)) else [layers]
    if not specs:
        raise InvalidArgumentError(
            "mask(layers=) is empty; name at least one layer (a name, path or glob). "
            + received(layers=layers))
    patterns = [_pattern(p, "layers") for p in specs]

    def owners(grads: Grads) -> dict[str, str]:
        return owner_patterns(grads, patterns, "mask")

    def zero(grads: Grads) -> Grads:
        found, ops = owners(grads), ops_for(grads)
        return map_grads(lambda k, g: ops.zeros_like(g) if k in found else ops.scaled(g, 1.0),
                         grads)

    return stateless(zero, check=owners)


freeze = mask


def owner_patterns(grads: Grads, patterns: list[str], who: str,
                   exclusive: bool = False) -> dict[str, str]:
    """``{key: the pattern matching its layer}``; an error if a pattern matches nothing, or
    (`exclusive`) if two patterns match one layer."""
    owners: dict[str, str] = {}
    for pattern in patterns:
        hits = [k for k in grads if _matches(pattern, layer_of(k))]
        if not hits:
            layers = sorted({layer_of(k) for k in grads})
            listed = ", ".join(layers[:20]) + (" ..." if len(layers) > 20 else "")
            raise UnknownLayerError(
                f"{who}: the pattern {pattern!r} matches no layer of this gradient set, whose "
                f"layers are: {listed or '(none)'}. "
                "A pattern matches a layer path (the key without its last /part) or a "
                "trailing part of it, with fnmatch globs. " + received(pattern=pattern))
        for k in hits:
            if exclusive and owners.get(k, pattern) != pattern:
                raise InvalidArgumentError(
                    f"{who}: the layer {layer_of(k)!r} matches both {owners[k]!r} and "
                    f"{pattern!r}, so its factor is ambiguous. Make the patterns disjoint. "
                    + received(patterns=[owners[k], pattern]))
            owners[k] = pattern
    return owners


def _matches(pattern: str, layer: str) -> bool:
    parts = layer.split("/")
    return bool(layer) and any(
        fnmatch.fnmatchcase("/".join(parts[i:]), pattern) for i in range(len(parts)))


def _pattern(value: Any, name: str) -> str:
    if isinstance(value, str) and value:
        return value
    raise InvalidArgumentError(
        f"{name}: layer patterns are non-empty strings (a name, a path such as "
        "'encoder/dense' or a glob such as 'dense*'); pass layer.name for a Layer object. "
        + received(**{name: value}))
