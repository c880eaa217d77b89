"""bayes: mean-field Gaussian weights on any parameter of any ``nn.Module``.

Convert a trained model with :func:`bayesianize` (modules keep their own classes), train mu and
sigma with :func:`sigma_regularizer` (the paper's objective) or :func:`kl_divergence` (a
standard ELBO), switch forward modes with :func:`forward_mode`, and go back with
:func:`to_point_estimate`.
"""

from .convert import (
    NORM_TYPES,
    ParamSite,
    bayesianize,
    copy_model,
    fold_parametrizations,
    foreign_parametrization,
    is_norm_module,
    parameter_sites,
    point_state_dict,
    sample_point_estimate,
    select_sites,
    to_point_estimate,
)
from .errors import BayesError, ConversionError
from .init import (
    DEFAULT_SIGMA_FLOOR,
    constant_sigma,
    laplace_sigma,
    moped_sigma,
    power_of_two_distance,
    power_of_two_sigma,
    resolve_sigma_init,
    tensor_scale,
)
from .layers import (
    MODES,
    GaussianEntry,
    GaussianParameter,
    bayesian_modules,
    forward_mode,
    gaussian_parameters,
    gaussians_of,
    is_bayesian,
    local_mode_coverage,
    local_rule_for,
    mu_of,
    register_local_rule,
    set_forward_mode,
    sigma_parameters,
)
from .losses import kl_divergence, sigma_regularizer
from .stats import sigma_stats, summarize_sigma

__all__ = [
    "DEFAULT_SIGMA_FLOOR",
    "MODES",
    "NORM_TYPES",
    "BayesError",
    "ConversionError",
    "GaussianEntry",
    "GaussianParameter",
    "ParamSite",
    "bayesian_modules",
    "bayesianize",
    "copy_model",
    "constant_sigma",
    "fold_parametrizations",
    "foreign_parametrization",
    "forward_mode",
    "gaussian_parameters",
    "gaussians_of",
    "is_bayesian",
    "is_norm_module",
    "kl_divergence",
    "laplace_sigma",
    "local_mode_coverage",
    "local_rule_for",
    "moped_sigma",
    "mu_of",
    "parameter_sites",
    "point_state_dict",
    "power_of_two_distance",
    "power_of_two_sigma",
    "register_local_rule",
    "resolve_sigma_init",
    "sample_point_estimate",
    "select_sites",
    "set_forward_mode",
    "sigma_parameters",
    "sigma_regularizer",
    "sigma_stats",
    "summarize_sigma",
    "tensor_scale",
    "to_point_estimate",
]
