"""A Gamma-Poisson model: a positive local latent with an exact marginal likelihood.

    rate_i ~ Gamma(alpha, beta)   (site "rate", shape rate; positive: the library's chains and
                                   q's run in u = log rate, with the log-Jacobian)
    x_ij | rate_i ~ Poisson(rate_i),  j = 1..m

Conjugacy gives the posterior Gamma(alpha + S_i, beta + m), S_i = sum_j x_ij, and

    log p(x_i) = lgamma(alpha + S_i) - lgamma(alpha) + alpha log beta
                 - (alpha + S_i) log(beta + m) - sum_j lgamma(x_ij + 1),

a ground truth for every estimator of log p(x) on a non-Gaussian, skewed posterior (skewed most
for small counts). `gamma_poisson_log_marginal` computes it in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpyro
import numpyro.distributions as dist
from scipy.special import gammaln

from amortjax.models.core import data_plate


def gamma_poisson_model(alpha: float, beta: float) -> Callable:
    """The model `model(x, *, n_data=None)` for counts x `[N, m]` (local latent site "rate")."""

    def model(x, *, n_data=None):
        with data_plate(x, n_data):
            rate = numpyro.sample("rate", dist.Gamma(alpha, beta))
            # expanded to x's shape, so that `simulate` draws all m counts
            likelihood = dist.Poisson(rate[..., None]).expand(x.shape).to_event(1)
            numpyro.sample("x", likelihood, obs=x)

    return model


def gamma_poisson_log_marginal(x, alpha: float, beta: float) -> np.ndarray:
    """The exact log p(x_i) of every row of counts x `[N, m]`, `[N]`, in float64."""
    x = np.asarray(x, np.float64)
    s, m = x.sum(-1), x.shape[-1]
    return (
        gammaln(alpha + s)
        - gammaln(alpha)
        + alpha * np.log(beta)
        - (alpha + s) * np.log(beta + m)
        - gammaln(x + 1).sum(-1)
    )
