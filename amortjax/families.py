"""Variational families over the flattened local latent vector of one datapoint.

A family fixes the layout of the variational parameters lambda_i `[..., num_params(z_dim)]` so
that an encoder (amortized), free per-datapoint parameters (per-example) and a refinement
(semi-amortized) all produce the same thing, and turns lambda_i into a NumPyro distribution with
event shape `[z_dim]`.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
import numpyro.distributions as dist


class Family(Protocol):
    """The interface every family implements."""

    name: str

    def num_params(self, z_dim: int) -> int:
        """Size of lambda for a latent of size z_dim."""
        ...

    def distribution(self, params: jax.Array) -> dist.Distribution:
        """q(z; lambda) for params `[..., num_params]`, event shape `[z_dim]`."""
        ...

    def standard_params(self, z_dim: int) -> jax.Array:
        """lambda of the standard normal N(0, I) (the prior of a VAE), `[num_params]`."""
        ...


class DiagonalGaussian:
    """The fully factorized Gaussian (FFG): q(z) = N(z; mu, diag(sigma^2)).

    Layout: lambda = [mu (z_dim), log sigma (z_dim)].
    """

    name = "diagonal"

    def num_params(self, z_dim: int) -> int:
        return 2 * z_dim

    def split(self, params: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns `(loc, log_scale)`, each `[..., z_dim]`."""
        loc, log_scale = jnp.split(params, 2, axis=-1)
        return loc, log_scale

    def pack(self, loc: jax.Array, scale: jax.Array) -> jax.Array:
        """Inverse of `split` from a location and a (positive) scale: `[..., 2 * z_dim]`."""
        loc, scale = jnp.broadcast_arrays(loc, scale)
        return jnp.concatenate([loc, jnp.log(scale)], axis=-1)

    def distribution(self, params: jax.Array) -> dist.Distribution:
        loc, log_scale = self.split(params)
        return dist.Normal(loc, jnp.exp(log_scale)).to_event(1)

    def mean(self, params: jax.Array) -> jax.Array:
        return self.split(params)[0]

    def standard_params(self, z_dim: int) -> jax.Array:
        return jnp.zeros(2 * z_dim)


FAMILIES: dict[str, Family] = {"diagonal": DiagonalGaussian()}


def get_family(name: str) -> Family:
    """Looks up a family by name, with an error listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; choose one of {sorted(FAMILIES)}") from None
