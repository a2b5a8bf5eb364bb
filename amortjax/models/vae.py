"""The VAE's generative model and its conditional variant.

`vae_model`: p_theta(x_i, z_i) = N(z_i; 0, I) p_theta(x_i | z_i), a decoder network giving the
likelihood's parameters. `conditional_vae_model` (Sohn et al. 2015): each row carries a
condition c_i (a one-hot label, or an observed part of the image) before the modelled part x_i,

    row_i = [c_i, x_i],    p_theta(x_i, z_i | c_i) = N(z_i; 0, I) p_theta(x_i | z_i, c_i),

so the encoder sees the whole row (q(z_i | x_i, c_i)) and every evaluator, trainer and guide of
the library works on conditional models unchanged: a row is one datapoint.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.module import flax_module

from amortjax.checks import check_int
from amortjax.models.core import data_plate, get_likelihood


def vae_model(
    decoder: nn.Module, *, z_dim: int, likelihood: str = "bernoulli"
) -> Callable[..., None]:
    """The VAE's generative model p_theta(x_i, z_i) = N(z_i; 0, I) p_theta(x_i | z_i).

    Args:
        decoder: a Flax module mapping z `[..., z_dim]` to the likelihood's parameters
            `[..., x_dim]` (logits for Bernoulli, means for Gaussian).
        z_dim: latent size.
        likelihood: "bernoulli" or "gaussian".

    Returns:
        A NumPyro model `model(x, *, n_data=None)`, x `[batch, x_dim]`, with latent site "z"
        `[batch, z_dim]` and observed site "x" in the plate `DATA_PLATE`. Its decoder
        parameters are the param site "decoder$params".
    """
    check_int("vae_model", z_dim=z_dim)
    lik = get_likelihood(likelihood)

    def model(x: jax.Array, *, n_data: int | None = None) -> None:
        net = flax_module("decoder", decoder, input_shape=(1, z_dim))
        with data_plate(x, n_data):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([z_dim]).to_event(1))
            numpyro.sample("x", lik.distribution(net(z)), obs=x)

    return model


def decode_mean(
    decoder: nn.Module, params: dict, z: jax.Array, *, likelihood: str = "bernoulli"
) -> jax.Array:
    """E[x | z] under a trained decoder: z `[..., z_dim]` -> `[..., x_dim]` (pixel probabilities
    for a Bernoulli likelihood)."""
    out = decoder.apply({"params": params["decoder$params"]}, z)
    return get_likelihood(likelihood).mean(out)


def pack_condition(condition: jax.Array, x: jax.Array) -> jax.Array:
    """Rows `[c_i, x_i]` for a conditional model: condition `[N, c_dim]`, x `[N, x_dim]` ->
    `[N, c_dim + x_dim]`."""
    condition, x = jnp.asarray(condition), jnp.asarray(x)
    if condition.ndim != 2 or x.ndim != 2 or condition.shape[0] != x.shape[0]:
        raise ValueError(
            f"condition and x must be [N, c_dim] and [N, x_dim] with the same N; got "
            f"{condition.shape} and {x.shape}"
        )
    return jnp.concatenate([condition.astype(x.dtype), x], axis=1)


def conditional_vae_model(
    decoder: nn.Module, *, z_dim: int, condition_dim: int, likelihood: str = "bernoulli"
) -> Callable[..., None]:
    """A conditional VAE p_theta(x_i, z_i | c_i) = N(z_i; 0, I) p_theta(x_i | decoder([z_i, c_i])).

    Args:
        decoder: a Flax module mapping `[..., z_dim + condition_dim]` to the likelihood's
            parameters `[..., x_dim]`.
        z_dim: latent size.
        condition_dim: size of the condition c_i at the start of each row.
        likelihood: "bernoulli" or "gaussian" (of x_i; the condition is not modelled).

    Returns:
        A NumPyro model `model(rows, *, n_data=None)`, rows `[batch, condition_dim + x_dim]`
        (see `pack_condition`), with latent site "z" and observed site "x" (the row's last
        x_dim entries) in the data plate.
    """
    lik = get_likelihood(likelihood)

    def model(rows: jax.Array, *, n_data: int | None = None) -> None:
        if rows.shape[-1] <= condition_dim:
            raise ValueError(
                f"rows must be [batch, condition_dim={condition_dim} + x_dim]; got {rows.shape}"
            )
        c, x = rows[..., :condition_dim], rows[..., condition_dim:]
        net = flax_module("decoder", decoder, input_shape=(1, z_dim + condition_dim))
        with data_plate(rows, n_data):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([z_dim]).to_event(1))
            numpyro.sample("x", lik.distribution(net(jnp.concatenate([z, c], -1))), obs=x)

    return model
