"""Errors raised by the variational layer library (independent of pwfn)."""


class BayesError(ValueError):
    """A bad argument to a Bayesian layer, initialiser, loss or conversion."""


class ConversionError(BayesError):
    """A model cannot be converted (nothing to convert, tied weights, unsupported layer ...)."""
