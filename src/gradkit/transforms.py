"""Gradient transformations: change a gradient set before it is applied.

The contract is optax's. A `GradientTransformation` is a NamedTuple of two pure functions::

    init(grads) -> state
    update(grads, state) -> (new_grads, new_state)

over gradient sets ``{variable path: np.ndarray or None}`` (what `gradkit.gradients` returns).
Neither modifies its arguments; each array keeps its dtype; ``None`` values pass through.
`chain` applies several in order (the order matters: clipping then scaling is not scaling
then clipping)::

    import gradkit as gk
    from gradkit import transforms as T

    tx = T.chain(T.clip_by_global_norm(1.0), T.mask(layers="embedding"), T.scale(0.5))
    state = tx.init(grads)
    new_grads, state = tx.update(grads, state)
    gk.apply(model, new_grads)                    # one optimizer step with them

The same transforms run inside ``fit``: ``wrap(optimizer, transform)`` gives an optimizer
whose compiled step applies the transform to the true-scale gradients before its update::

    model.compile(optimizer=T.wrap(keras.optimizers.SGD(0.1), T.clip_by_global_norm(1.0)))

Layer patterns (`scale_by_layer`, `mask`) are fnmatch globs matched against the layer part
of each key (the key without its last ``/part``) or a trailing part of it, as ``layers=``
matches names and paths. Bad arguments raise `gradkit.InvalidArgumentError`.
"""

from gradkit._transforms._base import (
    EmptyState as EmptyState,
    GradientTransformation as GradientTransformation,
    HostOnlyTransformation as HostOnlyTransformation,
    chain as chain,
)
from gradkit._transforms._clipping import (
    clip_by_global_norm as clip_by_global_norm,
    clip_by_norm as clip_by_norm,
    clip_by_value as clip_by_value,
)
from gradkit._transforms._finite import (
    ApplyIfFiniteState as ApplyIfFiniteState,
    apply_if_finite as apply_if_finite,
)
from gradkit._transforms._noise import AddNoiseState as AddNoiseState, add_noise as add_noise
from gradkit._transforms._scaling import (
    freeze as freeze,
    mask as mask,
    scale as scale,
    scale_by_layer as scale_by_layer,
)
from gradkit._transforms._wrap import wrap as wrap

__all__ = [
    "AddNoiseState",
    "ApplyIfFiniteState",
    "EmptyState",
    "GradientTransformation",
    "HostOnlyTransformation",
    "add_noise",
    "apply_if_finite",
    "chain",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "freeze",
    "mask",
    "scale",
    "scale_by_layer",
    "wrap",
]
