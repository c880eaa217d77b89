"""bayes: mean-field Gaussian Linear/Conv layers that stay plain ``nn.Module``s.

Convert any trained model with :func:`bayesianize`, train mu and sigma with
:func:`sigma_regularizer` (the paper's objective) or :func:`kl_divergence` (a standard ELBO),
switch forward modes with :func:`forward_mode`, and go back with :func:`to_point_estimate`.
"""

from .convert import bayesianize, sample_point_estimate, to_point_estimate
from .errors import BayesError, ConversionError
from .init import (
    DEFAULT_SIGMA_FLOOR,
    constant_sigma,
    moped_sigma,
    power_of_two_distance,
    power_of_two_sigma,
    resolve_sigma_init,
)
from .layers import (
    BAYESIAN_COUNTERPARTS,
    MODES,
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesianLayer,
    BayesLinear,
    bayesian_layers,
    forward_mode,
    set_forward_mode,
)
from .losses import kl_divergence, sigma_regularizer
from .stats import sigma_stats, summarize_sigma

__all__ = [
    "BAYESIAN_COUNTERPARTS",
    "DEFAULT_SIGMA_FLOOR",
    "MODES",
    "BayesConv1d",
    "BayesConv2d",
    "BayesConv3d",
    "BayesError",
    "BayesLinear",
    "BayesianLayer",
    "ConversionError",
    "bayesian_layers",
    "bayesianize",
    "constant_sigma",
    "forward_mode",
    "kl_divergence",
    "moped_sigma",
    "power_of_two_distance",
    "power_of_two_sigma",
    "resolve_sigma_init",
    "set_forward_mode",
    "sigma_regularizer",
    "sigma_stats",
    "summarize_sigma",
    "sample_point_estimate",
    "to_point_estimate",
]
