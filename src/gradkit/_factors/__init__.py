"""Per-example gradients of Dense, EinsumDense, Embedding, Conv (grouped too), ConvTranspose,
SeparableConv, DepthwiseConv, Layer- and GroupNormalization and (inference)
BatchNormalization layers as factors: layer input × output gradient.

For a Dense layer ``z = a·W + b`` (then its activation), example i's gradients are

    g_W = Σ_t a_t δ_tᵀ        g_b = Σ_t δ_t

over its positions t (one for a flat input, every timestep of a sequence), with ``a`` the layer
input and ``δ = ∂L_i/∂z`` the gradient at the pre-activation. An Embedding scatters ``δ_t``
into row ``id_t``. A layer called more than once (shared) adds every call's positions. So the
small per-example factors ``(a, δ)`` carry the whole gradient: the front door writes
``a δᵀ`` straight into its NumPy result (one write of B × P numbers) or takes the norm from
them without forming it (``||g_W||² = Σ_{t,s} (a_t·a_s)(δ_t·δ_s)``). A convolution is the
same sum over its output positions, with ``a_t`` the input patch under position t: its
factors keep their spatial shape and its geometry (`_conv`); a grouped one is one such
convolution per group; a depthwise convolution sums each channel's patches against that
channel's deltas only; a transposed one is the convolution it transposes with the roles of
input and δ swapped; a separable one's two kernels follow from the full convolution's
kernel gradient and the other kernel. A BatchNormalization with its moving
statistics is a fixed affine map per channel, a Layer- or GroupNormalization one per
position or per group of each example (`_normalization`); an EinsumDense is its own einsum
with the batch letter kept (`_einsum`).

Each layer kind is one entry of the registry (`_registry.KINDS`): the classes it covers, its
roles (kernel, bias, embeddings) with their regularizers, rows writer (`_rows`), squared
norm (`_norms`) and weighted sum (`_sums`), its factor layout (`_arrays`) and where its δ is
taken. `LayerTaps` (`_taps`) collects the factors: the adapter differentiates each example's
objective with respect to zero perturbations at the planned layers' pre-activations (or
outputs) inside its vectorizer. A weight regularizer's gradient, the same for every example,
is added to each row (`_regularizers`; the adapter takes it). Layers not planned (other
types; LoRA, quantized or customized layers of these kinds) are differentiated directly.
Framework-free: adapters pass their ops.
"""

from gradkit._factors._arrays import Ops as Ops
from gradkit._factors._conv import Geometry as Geometry
from gradkit._factors._conv import conv_geometry as conv_geometry
from gradkit._factors._registry import KINDS as KINDS
from gradkit._factors._registry import Factor as Factor
from gradkit._factors._registry import Kind as Kind
from gradkit._factors._registry import Planned as Planned
from gradkit._factors._registry import Role as Role
from gradkit._factors._registry import plan as plan
from gradkit._factors._registry import rest as rest
from gradkit._factors._registry import squared_rows as squared_rows
from gradkit._factors._registry import unfactored_convolution as unfactored_convolution
from gradkit._factors._registry import weighted_sum as weighted_sum
from gradkit._factors._registry import write_rows as write_rows
from gradkit._factors._taps import LayerTaps as LayerTaps
from gradkit._factors._taps import assemble as assemble
from gradkit._factors._taps import factor_arrays as factor_arrays
from gradkit._factors._taps import with_regularizers as with_regularizers

__all__ = [
    "Factor",
    "Geometry",
    "KINDS",
    "Kind",
    "LayerTaps",
    "Ops",
    "Planned",
    "Role",
    "assemble",
    "conv_geometry",
    "factor_arrays",
    "plan",
    "rest",
    "squared_rows",
    "unfactored_convolution",
    "weighted_sum",
    "with_regularizers",
    "write_rows",
]
