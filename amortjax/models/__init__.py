"""NumPyro models with local latents.

- `core`: the data plate, likelihoods, input checks, `with_fixed_params` (shared by all).
- `vae`: the VAE and the conditional VAE.
- `factor_analysis`: factor analysis / probabilistic PCA, with exact log p(x) and posterior.
- `gamma_poisson`: a Gamma rate with Poisson counts, with exact log p(x) (a skewed, positive
  latent).
- `linear_gaussian`: the linear-Gaussian model, the ground truth of the tests (closed-form
  log p(x), posterior and best diagonal Gaussian, in float64).
- `irt`: an item-response model (people answering binary questions), with global question
  latents beside the local traits.

Every model is a plain NumPyro model `model(x, *, n_data=None)` whose local latents and
observations live in the plate `DATA_PLATE`; nothing in the library depends on which one.
"""

from amortjax.models.core import (
    DATA_PLATE,
    LIKELIHOODS,
    Bernoulli,
    BernoulliLogits,
    Gaussian,
    check_observations,
    data_plate,
    get_likelihood,
    simulate,
    with_fixed_params,
)
from amortjax.models.vae import conditional_vae_model, decode_mean, pack_condition, vae_model

__all__ = [
    "DATA_PLATE",
    "LIKELIHOODS",
    "Bernoulli",
    "BernoulliLogits",
    "Gaussian",
    "check_observations",
    "conditional_vae_model",
    "data_plate",
    "decode_mean",
    "get_likelihood",
    "pack_condition",
    "simulate",
    "vae_model",
    "with_fixed_params",
]
