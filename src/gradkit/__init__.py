"""gradkit: concrete NumPy gradients of Keras models, on every Keras backend.

    import gradkit as gk
    grads = gk.gradients(model, x, y)        # {"dense/kernel": np.ndarray, ...}

Importing gradkit imports no framework; the adapter of a model's flavour is loaded on use.
"""

from gradkit import transforms as transforms
from gradkit._accumulate import accumulate as accumulate
from gradkit._activation_gradients import activation_gradients as activation_gradients
from gradkit._apply import apply as apply
from gradkit._check import (
    GradientCheck as GradientCheck,
    VariableCheck as VariableCheck,
    check_gradients as check_gradients,
)
from gradkit._clipped import clipped_gradients as clipped_gradients
from gradkit._curvature import (
    HessianEigen as HessianEigen,
    TraceEstimate as TraceEstimate,
    hessian_eigenvalues as hessian_eigenvalues,
    hessian_trace as hessian_trace,
)
from gradkit._dataset_hessian import ggn_vp_over as ggn_vp_over, hvp_over as hvp_over
from gradkit._density import (
    SpectralDensity as SpectralDensity,
    hessian_density as hessian_density,
)
from gradkit._errors import (
    CustomTrainStepWarning as CustomTrainStepWarning,
    DataShapeError as DataShapeError,
    GradientNormWarning as GradientNormWarning,
    GradkitError as GradkitError,
    GradkitFileError as GradkitFileError,
    InvalidArgumentError as InvalidArgumentError,
    NonFiniteGradientError as NonFiniteGradientError,
    NonFiniteGradientWarning as NonFiniteGradientWarning,
    NotConvergedError as NotConvergedError,
    ProcessGroupError as ProcessGroupError,
    ResultTooLargeError as ResultTooLargeError,
    UnconnectedGradientError as UnconnectedGradientError,
    UnknownLayerError as UnknownLayerError,
    UnsupportedModelError as UnsupportedModelError,
)
from gradkit._fisher import fisher_diagonal as fisher_diagonal
from gradkit._ggn import ggn_vp as ggn_vp
from gradkit._gradients import gradients as gradients, loss_and_gradients as loss_and_gradients
from gradkit._hvp import hvp as hvp
from gradkit._input_gradients import input_gradients as input_gradients
from gradkit._io import load as load, save as save
from gradkit._locate import locate_nonfinite as locate_nonfinite
from gradkit._monitor._callback import GradientMonitor as GradientMonitor
from gradkit._monitor._plots import (
    plot_gradient_flow as plot_gradient_flow,
    plot_histograms as plot_histograms,
)
from gradkit._norms import per_example_norms as per_example_norms
from gradkit._per_example import per_example_gradients as per_example_gradients
from gradkit._stats import GradientStats as GradientStats, gradient_stats as gradient_stats
from gradkit._table import summary as summary

__version__ = "0.1.0"

__all__ = [
    "CustomTrainStepWarning",
    "DataShapeError",
    "GradientCheck",
    "GradientMonitor",
    "GradientNormWarning",
    "GradientStats",
    "GradkitError",
    "GradkitFileError",
    "HessianEigen",
    "InvalidArgumentError",
    "NonFiniteGradientError",
    "NonFiniteGradientWarning",
    "NotConvergedError",
    "ProcessGroupError",
    "ResultTooLargeError",
    "SpectralDensity",
    "TraceEstimate",
    "UnconnectedGradientError",
    "UnknownLayerError",
    "UnsupportedModelError",
    "VariableCheck",
    "accumulate",
    "activation_gradients",
    "apply",
    "check_gradients",
    "clipped_gradients",
    "fisher_diagonal",
    "ggn_vp",
    "ggn_vp_over",
    "gradient_stats",
    "gradients",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "hvp",
    "hvp_over",
    "input_gradients",
    "load",
    "locate_nonfinite",
    "loss_and_gradients",
    "per_example_gradients",
    "per_example_norms",
    "plot_gradient_flow",
    "plot_histograms",
    "save",
    "summary",
    "transforms",
]
