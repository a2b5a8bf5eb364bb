"""Guides with free variational parameters per datapoint (per-example inference).

`given_params_guide` is q(z_i; lambda_i) for lambdas passed in by the caller (e.g. the output of
the local optimizer, `amortjax.inference.local.fit_local`), so the evaluators that take a guide
(ELBO, IWAE-k) score q* exactly as they score an encoder's q.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpyro

from amortjax.families import DiagonalGaussian, Family
from amortjax.models import data_plate


def given_params_guide(family: Family | None = None, *, site: str = "z") -> Callable[..., None]:
    """q(z_i; lambda_i) with lambda given for each datapoint of the batch.

    Args:
        family: the variational family; the diagonal Gaussian by default.
        site: the model's latent site.

    Returns:
        A guide `guide(x, lam, *, n_data=None)`, x `[batch, ...]`, lam `[batch, num_params]`.
    """
    family = family or DiagonalGaussian()

    def guide(x: jax.Array, lam: jax.Array, *, n_data: int | None = None) -> None:
        with data_plate(x, n_data):
            numpyro.sample(site, family.distribution(lam))

    return guide
