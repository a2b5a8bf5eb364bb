"""NumPyro guides for the inference regimes; here, the amortized one.

NumPyro has no amortized autoguide: `amortized_guide` makes q(z_i | x_i) = q(z_i; f_phi(x_i)),
an encoder network's output read as the parameters of a variational family, usable with plain
`numpyro.infer.SVI` and any NumPyro ELBO (Trace_ELBO, TraceMeanField_ELBO, RenyiELBO).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import numpyro
from numpyro.contrib.module import flax_module

from amortjax.families import DiagonalGaussian, Family
from amortjax.models import data_plate


def amortized_guide(
    encoder: nn.Module,
    *,
    x_dim: int,
    family: Family | None = None,
    site: str = "z",
) -> Callable[..., None]:
    """q_phi(z_i | x_i) = q(z_i; lambda_i), lambda_i = encoder(x_i).

    Args:
        encoder: a Flax module mapping x `[..., x_dim]` to lambda `[..., family.num_params]`.
        x_dim: observation size (for the encoder's initialization).
        family: the variational family; the diagonal Gaussian by default.
        site: name of the model's latent site that the guide covers.

    Returns:
        A NumPyro guide `guide(x, *, n_data=None)` with the param site "encoder$params".
    """
    family = family or DiagonalGaussian()

    def guide(x: jax.Array, *, n_data: int | None = None) -> None:
        net = flax_module("encoder", encoder, input_shape=(1, x_dim))
        with data_plate(x, n_data):
            numpyro.sample(site, family.distribution(net(x)))

    return guide


def encode(encoder: nn.Module, params: dict, x: jax.Array) -> jax.Array:
    """The encoder's variational parameters lambda `[..., num_params]` for x `[..., x_dim]`."""
    return encoder.apply({"params": params["encoder$params"]}, x)
